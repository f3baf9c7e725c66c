"""benchmarks/train_step.py on the reference's tiny shapes (CPU): rows right-padded to a multiple
(`--row-multiple`) train on the same samples, so the step's loss is the same, while the JSON line
counts the samples' tokens only. `--back-to-back` changes only when the host waits for the steps."""

from benchmarks import train_step


def test_rows_padded_to_a_multiple_give_the_same_loss_and_count_the_same_tokens(capsys):
    args = ["--tiny", "--steps", "1", "--warmup", "1", "--dtype", "float32", "--batch-per-device", "1"]
    exact = train_step.main(args + ["--row-multiple", "1"])
    # The default row multiple, 64; timed back to back, which must run the same steps (the loss
    # is the last step's).
    padded = train_step.main(args + ["--back-to-back"])
    capsys.readouterr()
    assert exact["row_len"] == exact["seq"] and exact["seq"] % 64 != 0
    assert padded["row_len"] % 64 == 0 and padded["row_len"] > padded["seq"] == exact["seq"]
    assert padded["tokens_per_step"] == exact["tokens_per_step"]
    assert abs(padded["loss"] - exact["loss"]) < 1e-5 * abs(exact["loss"])
    assert (exact["timing"], padded["timing"]) == ("per_step", "back_to_back") and padded["step_s_median"] > 0
