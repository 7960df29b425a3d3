import io

from cpfcte.machinery.progress import MIN_INTERVAL_S, progress_bar


def test_bars_redraw_at_most_once_a_second():
    out = io.StringIO()
    bar = progress_bar(range(3), file=out)
    assert bar.mininterval == MIN_INTERVAL_S == 1.0
    assert list(bar) == [0, 1, 2]
    assert progress_bar(total=5, mininterval=0.2, file=out).mininterval == 0.2
