"""The prompts file of `run.py generate --prompts FILE.jsonl` and its answers file (`--output`).

The answers file holds one JSON line per prompt, in the prompts' order, appended and synced batch
by batch, so a run that is killed leaves the answers of its finished batches. A relaunch with the
same --output checks those lines against the prompts file and the generation settings and goes
on after the last complete one; a line cut short by the kill is dropped and generated again.
Prompt i samples from stream i of the seed, so the resumed answers are those of one straight run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field

from manager_jax.data.conversation import DEFAULT_IMAGE_TOKEN
from manager_jax.infer.engine import InputError
from manager_jax.infer.loading import ImageLoadError, load_image

KEYS = ("prompt", "images", "id")


@dataclass
class PromptLine:
    """One prompt: from a line of the file, or the --prompt / --image options."""

    where: str  # FILE:LINE, or "--prompt"
    index: int  # position among the file's prompts (blank lines left out): its answer's line and sampling stream
    number: int = 0  # line number in the file
    text: str = ""
    paths: list[str] = field(default_factory=list)
    id: object = None  # the line's "id", copied into its answer
    digest: str = ""  # of the line as written, to recognise it on resume
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) per image, once checked
    error: str | None = None  # why it is skipped (--skip-bad); None: it is answered


UTF8_BOM = b"\xef\xbb\xbf"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def refuse_or_skip(line: PromptLine, reason: str, skip_bad: bool) -> None:
    """A bad line: refuses the whole file (naming FILE:LINE), or with --skip-bad marks the line skipped."""
    if not skip_bad:
        raise InputError(f"{line.where}: {reason}")
    line.error = reason


def read_prompts(path: str, skip_bad: bool = False) -> list[PromptLine]:
    """Every non-blank line of a JSONL prompts file; relative image paths resolve against its folder."""
    if os.path.isdir(path):
        raise InputError(f"prompts file {path!r} is a directory; give a JSONL file of prompts")
    if not os.path.isfile(path):
        raise InputError(f"prompts file not found: {path!r}")
    base = os.path.dirname(os.path.abspath(path))
    lines: list[PromptLine] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if number == 1 and raw.startswith(UTF8_BOM):  # what some Windows editors write first
                raw = raw[len(UTF8_BOM):]
            if not raw.strip():
                continue
            line = PromptLine(f"{path}:{number}", len(lines), number, digest=_digest(raw))
            lines.append(line)
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:  # a ValueError, not a JSON one: it crashed the reader before
                refuse_or_skip(line, f"not UTF-8 text ({e.reason} at byte {e.start})", skip_bad)
                continue
            except json.JSONDecodeError as e:
                refuse_or_skip(line, f"not valid JSON ({e})", skip_bad)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                refuse_or_skip(line, "expected an object with a string 'prompt'", skip_bad)
                continue
            line.id = record.get("id")
            try:  # it is copied into the answer: JSON without NaN / Infinity, and UTF-8 (no lone surrogate)
                json.dumps(line.id, allow_nan=False, ensure_ascii=False).encode("utf-8")
            except (ValueError, UnicodeEncodeError):
                line.id = None
                refuse_or_skip(line, "'id' must be writable as JSON in UTF-8 (no NaN, Infinity or lone surrogate)",
                               skip_bad)
                continue
            unknown = sorted(set(record) - set(KEYS))
            if unknown:  # e.g. "image": its picture would be silently left out
                refuse_or_skip(line, f"unknown key(s) {', '.join(map(repr, unknown))}; a line has 'prompt' and "
                                     "optionally 'images' and 'id'", skip_bad)
                continue
            images = record.get("images", [])
            if isinstance(images, str):
                images = [images]
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                refuse_or_skip(line, "'images' must be a list of paths", skip_bad)
                continue
            line.text = record["prompt"]
            line.paths = [i if os.path.isabs(i) else os.path.join(base, i) for i in images]
    if not lines:
        raise InputError(f"{path}: no prompts")
    return lines


def check_images(lines: list[PromptLine], skip_bad: bool = False) -> None:
    """Decodes every image of every line once (then lets it go) for its size, and checks the
    "<image>" counts: a bad line fails here, before the model is loaded."""
    for line in lines:
        if line.error is not None:
            continue
        count = line.text.count(DEFAULT_IMAGE_TOKEN)
        if count and count != len(line.paths):
            refuse_or_skip(line, f"the prompt has {count} {DEFAULT_IMAGE_TOKEN!r} placeholders but "
                                 f"{len(line.paths)} images", skip_bad)
            continue
        for path in line.paths:
            try:
                image = load_image(path)
            except ImageLoadError as e:  # one prompt: its images come from --image
                where = "--image" if line.where == "--prompt" else line.where
                if not skip_bad:
                    raise ImageLoadError(f"{where}: {e}") from None
                line.error = str(e)
                break
            line.sizes.append(image.size)
            image.close()


class AnswerFile:
    """The --output file: the lines already there are checked before anything is computed
    (`resume`); `open` then takes it for this run, and `append` adds a batch's answers."""

    def __init__(self, path: str, settings: dict):
        self.path = path
        # Answers generated with other settings (seed, sampling, checkpoint, ...) must not be mixed in.
        self.settings = _digest(json.dumps(settings, sort_keys=True, default=str).encode())
        self.keep = 0  # bytes of complete lines
        self.seen = 0  # the file's size when checked
        self.file = None

    def resume(self, lines: list[PromptLine]) -> int:
        """How many prompts the file answers already (0 when there is none). Refuses a file whose
        lines are not this prompts file's answers in order, with these settings."""
        folder = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(self.path):
            raise InputError(f"--output {self.path!r} is a directory")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise InputError(f"--output {self.path!r}: its folder does not exist or is not writable")
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        self.seen = len(data)
        self.keep = data.rfind(b"\n") + 1  # what follows the last newline is a line cut short: redone
        complete = data[: self.keep].split(b"\n")[:-1]
        if len(complete) > len(lines):
            raise InputError(f"--output {self.path!r} has {len(complete)} lines but the prompts file has "
                             f"{len(lines)} prompts: it holds another file's answers")
        for k, raw in enumerate(complete):
            where = f"{self.path}:{k + 1}"
            try:
                record = json.loads(raw)
            except ValueError:
                raise InputError(f"{where}: not an answer line (not JSON); --output must be a file this "
                                 "command wrote") from None
            if not isinstance(record, dict) or record.get("index") != k or record.get("line_hash") != lines[k].digest:
                raise InputError(f"{where}: not the answer of {lines[k].where} (index {k}): the file holds the "
                                 "answers of another prompts file, or this one was edited; give another --output")
            if record.get("settings") != self.settings:
                raise InputError(f"{where}: generated with other settings (checkpoint, tokenizer, dtype, "
                                 "--max-length, --vocab-limit, --max-new-tokens, sampling or --seed): relaunch "
                                 "with the same ones, or give another --output")
        return len(complete)

    def open(self) -> None:
        """Takes the file for this run (one writer at a time) and drops a line cut short."""
        f = open(self.path, "ab")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise InputError(f"--output {self.path!r} is being written by another run") from None
            raise
        if os.fstat(f.fileno()).st_size != self.seen:
            f.close()
            raise InputError(f"--output {self.path!r} changed since it was checked (another run writing it?)")
        f.truncate(self.keep)
        self.file = f

    def append(self, records: list[dict]) -> None:
        """One write and a sync per batch: a crash leaves whole batches, at most one line cut short."""
        text = "".join(json.dumps({**r, "settings": self.settings}, ensure_ascii=False, allow_nan=False) + "\n"
                       for r in records)
        self.file.write(text.encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def answer_record(line: PromptLine, text: str | None = None, gen=None) -> dict:
    """The --output line of a prompt: its index, line number, id (when the line has one) and hash,
    then its answer, or the reason it was skipped."""
    record = {"index": line.index, "line": line.number}
    if line.id is not None:
        record["id"] = line.id
    record["line_hash"] = line.digest
    if gen is None:
        record["error"] = line.error
    else:
        record.update(text=text, token_ids=gen.token_ids, finish_reason=gen.finish_reason)
    return record
