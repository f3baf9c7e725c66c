"""Where per-step metrics go: `<output_dir>/metrics.jsonl`, TensorBoard, wandb (optional), tqdm.

Only process 0 writes; every other process gets a no-op writer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from manager_jax.train import run_files

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """Python scalars for JSON (numpy / jax scalars, non-finite floats as strings JSON accepts)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def memory_record(device: Any = None) -> dict:
    """This process's memory now, in GB: the host's resident set (``host_rss_gb``, None where
    /proc is missing) and, on an accelerator that reports it, one local device's bytes in use and
    their peak so far (``device_memory_gb``, ``device_peak_memory_gb``). A slow leak over a long
    run shows here before it kills the run."""
    record: dict[str, float | None] = {"host_rss_gb": None}
    try:
        with open("/proc/self/statm") as f:
            record["host_rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        pass
    stats = None
    if device is not None:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - a backend without the call; memory is extra information
            stats = None
    if stats and "bytes_in_use" in stats:
        record["device_memory_gb"] = stats["bytes_in_use"] / 1e9
        if "peak_bytes_in_use" in stats:
            record["device_peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
    return record


class _TensorBoard:
    """TensorBoard event file, written on the calling thread. tensorboardX's SummaryWriter writes
    from a thread that dies on a full disk, after which its bounded queue blocks the next
    `add_scalar` for ever: a run that hangs instead of training on. Here a failed write turns
    TensorBoard off with one warning; metrics.jsonl stays the record."""

    FLUSH_SECONDS = 120.0  # as SummaryWriter: a flush syncs the file

    def __init__(self, directory: str) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._writer = EventsWriter(os.path.join(directory, "events"))
        self._flushed = time.monotonic()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for name, value in values.items():
            self._writer.write_event(Event(wall_time=now, step=int(step), summary=scalar(name, value)))
        if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
            self._writer.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Fan-out of metric records: JSONL always, TensorBoard / wandb when enabled and available."""

    def __init__(
        self,
        output_dir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "manager_jax",
        wandb_run_name: str | None = None,
        config: dict | None = None,
        drop_after_step: int | None = None,
    ) -> None:
        """`drop_after_step`: records of later steps already in metrics.jsonl are removed first (a
        resumed run re-runs the steps after its checkpoint, so they are not listed twice)."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if drop_after_step is not None:
            drop_records_after(self.path, drop_after_step)
        self._jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                self._tb = _TensorBoard(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                logger.warning("tensorboardX is not installed; TensorBoard logging is off")
            except OSError as err:
                self._tensorboard_failed(err)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                logger.warning("logging.wandb=True but the wandb package is not installed; wandb logging is off")
            else:
                try:
                    self._wandb = wandb_lib.init(project=wandb_project, name=wandb_run_name, config=config,
                                                 resume="allow")
                except Exception as err:  # noqa: BLE001 - wandb's errors (login, network) have no common base
                    self._wandb_failed("wandb.init", err)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """One record: {"step": step, **metrics}."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._append(record)
        self._scalars(step, {k: v for k, v in record.items() if k != "step"})

    def evaluation(self, step: int, results: dict[str, Any]) -> None:
        """A held-out evaluation after `step`: an "eval" event in metrics.jsonl (metric records
        stay one per step) and its numbers as eval/<name> scalars in TensorBoard and wandb."""
        if not self.enabled:
            return
        self.event(step, "eval", **results)
        self._scalars(step, {f"eval/{k}": _plain(v) for k, v in results.items()})

    def _scalars(self, step: int, values: dict[str, Any]) -> None:
        """The numbers of `values` (not bools, strings or dicts) to TensorBoard and wandb."""
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            try:
                self._tb.scalars(step, numeric)
            except OSError as err:
                self._tensorboard_failed(err)
        if self._wandb is not None:
            try:
                self._wandb.log(numeric, step=step)
            except Exception as err:  # noqa: BLE001 - as in __init__
                self._wandb_failed("wandb.log", err)

    def event(self, step: int, kind: str, **info: Any) -> None:
        """A non-metric record (checkpoint saved, step skipped, ...) in metrics.jsonl."""
        if self.enabled:
            self._append({"step": int(step), "event": kind, **{k: _plain(v) for k, v in info.items()}})

    def _append(self, record: dict) -> None:
        """One line of metrics.jsonl; WriteFailed (the run stops: this file is its record) when the
        disk refuses it."""
        try:
            self._jsonl.write(json.dumps(record) + "\n")
        except OSError as err:
            raise run_files.WriteFailed(f"writing {self.path} failed: {run_files.cause(err)}") from err

    def _tensorboard_failed(self, err: OSError) -> None:
        logger.warning("TensorBoard logging is off: writing its events failed (%s); metrics.jsonl goes on",
                       run_files.cause(err))
        tb, self._tb = self._tb, None
        if tb is not None:
            try:
                tb.close()
            except OSError:
                pass  # the same failure, already said

    def _wandb_failed(self, call: str, err: Exception) -> None:
        """A run of days is not stopped by its dashboard (a lost login, network or wandb process):
        said once, wandb is off, metrics.jsonl goes on."""
        logger.warning("wandb logging is off: %s failed (%s: %s); metrics.jsonl goes on", call,
                       type(err).__name__, str(err)[:300])
        self._wandb = None

    def close(self) -> None:
        """Closes every sink, even when one fails; then raises WriteFailed for metrics.jsonl's failure."""
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as err:
                self._tensorboard_failed(err)
            self._tb = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as err:  # noqa: BLE001 - as in __init__
                self._wandb_failed("wandb.finish", err)
            self._wandb = None
        if self._jsonl is not None:
            jsonl, self._jsonl = self._jsonl, None
            try:
                jsonl.close()
            except OSError as err:
                raise run_files.WriteFailed(f"writing {self.path} failed: {run_files.cause(err)}") from err


def drop_records_after(path: str, step: int) -> int:
    """Rewrites metrics.jsonl (atomically) without the records of steps after `step` and without
    lines that are not JSON records (a line cut short by a crash); returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        run_files.write_atomically(path, "".join(kept))
        logger.info("%s: dropped %d records after step %d (they are run again)", path, dropped, step)
    return dropped


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl (metric records only, events left out)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if "event" not in rec:
                    out.append(rec)
    return out


class Progress:
    """tqdm progress bar on process 0 (silent elsewhere or when disabled)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float | None = None, **postfix: Any) -> None:
        if self._bar is not None:
            if loss is not None:
                postfix = {"loss": f"{loss:.4f}", **postfix}
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
