"""benchmarks/train_step.py on the reference's tiny shapes (CPU): rows right-padded to a multiple
(`--row-multiple`) train on the same samples, so the step's loss is the same, while the JSON line
counts the samples' tokens only."""

from benchmarks import train_step


def test_rows_padded_to_a_multiple_give_the_same_loss_and_count_the_same_tokens(capsys):
    args = ["--tiny", "--steps", "1", "--warmup", "1", "--dtype", "float32"]
    exact = train_step.main(args + ["--row-multiple", "1"])
    padded = train_step.main(args)  # the default: 64
    capsys.readouterr()
    assert exact["row_len"] == exact["seq"] and exact["seq"] % 64 != 0
    assert padded["row_len"] % 64 == 0 and padded["row_len"] > padded["seq"] == exact["seq"]
    assert padded["tokens_per_step"] == exact["tokens_per_step"]
    assert abs(padded["loss"] - exact["loss"]) < 1e-5 * abs(exact["loss"])
