import io

from cpfcte.machinery.progress import MIN_INTERVAL_S, progress_bar


def test_bars_redraw_at_most_once_a_second():
    out = io.StringIO()
    bar = progress_bar(range(3), file=out)
    assert bar.mininterval == MIN_INTERVAL_S == 1.0
    assert list(bar) == [0, 1, 2]
    assert progress_bar(total=5, mininterval=0.2, file=out).mininterval == 0.2


def test_a_finished_run_is_reused_without_a_bar_and_says_so(tiny_cfg, tmp_path, capsys):
    """ensure_trained on a complete run trains nothing and shows no "training 100%" bar; on a
    missing one it says in one line what it trains first."""
    from cpfcte.machinery.config import load_config
    from cpfcte.stages.train import ensure_trained, train

    cfg = tiny_cfg(epochs=1)
    ensure_trained("toy", tmp_path / "t", {**cfg.to_dict(), "profile": "toy"}, progress=False)
    first = capsys.readouterr().out
    assert first.startswith(f"training stage 1 into {tmp_path / 't'}: toy profile") and \
        "1 epochs" in first
    ensure_trained("toy", tmp_path / "t", progress=True)
    out = capsys.readouterr()
    assert out.out.startswith(f"using the trained run {tmp_path / 't'}") and "training" not in \
        out.err
    train(load_config("toy", cfg.to_dict()), tmp_path / "t", progress=True)   # called directly
    assert "training" not in capsys.readouterr().err
