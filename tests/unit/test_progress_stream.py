"""ClearingStream: a worker's stderr line replaces the parent's status line on a TTY instead of extending it."""
import io

from g2d.progress import ClearingStream


def test_every_new_line_erases_the_terminal_line_first():
    raw = io.StringIO()
    s = ClearingStream(raw)
    s.write("[g2d] a: retraining\n[g2d] b")
    s.write(" continues\n")
    s.write("")
    assert raw.getvalue() == "\r\033[K[g2d] a: retraining\n\r\033[K[g2d] b continues\n"
    assert s.getvalue() == raw.getvalue()  # everything else is the wrapped stream's
