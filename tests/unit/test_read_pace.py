"""The reader's pace with the Python walker loaded (`agent.daemon._ReadPace`).

Eager (read every PYTHON_READ_LAG_MS, records below the wakeup threshold included) for
ANNOUNCED_EAGER_S after each process announcement, exec or new Python code the reader's callbacks
counted, and while
the pipeline says so; otherwise the reader waits for batched wakeups, as it does without the walker.
"""

from __future__ import annotations

from collections import Counter

from agent.daemon import ANNOUNCED_EAGER_S, _ReadPace


def test_announcements_make_the_reads_eager_for_a_while() -> None:
    now = [100.0]
    events: Counter[str] = Counter({"new": 3, "exec": 1})
    pace = _ReadPace(events, lambda: False, lambda: now[0])
    assert pace.eager()  # the first look counts what came before as news: the start-up's announcements
    now[0] += ANNOUNCED_EAGER_S * 1.01
    assert not pace.eager()
    events["exec"] += 1
    assert pace.eager()
    now[0] += ANNOUNCED_EAGER_S * 0.5
    events["new"] += 1
    assert pace.eager()  # the reader looks before each poll: from then on, measured from this one
    now[0] += ANNOUNCED_EAGER_S * 0.9
    assert pace.eager()
    now[0] += ANNOUNCED_EAGER_S * 0.2
    assert not pace.eager()


def test_the_pipeline_keeps_the_reads_eager() -> None:
    now = [0.0]
    pipeline = [True]
    pace = _ReadPace(Counter({"new": 0, "exec": 0}), lambda: pipeline[0], lambda: now[0])
    pace.eager()
    now[0] = 1000.0
    assert pace.eager()
    pipeline[0] = False
    assert not pace.eager()


def test_new_python_code_makes_the_reads_eager() -> None:
    """The walker's PROC_EVENT_PYTHON_CODE: a running process met code it had not run before, whose
    samples must reach the pipeline while the process lives."""
    now = [100.0]
    events: Counter[str] = Counter({"new": 1, "exec": 0, "python_code": 4})
    pace = _ReadPace(events, lambda: False, lambda: now[0])
    pace.eager()
    now[0] += ANNOUNCED_EAGER_S * 1.01
    assert not pace.eager()
    events["python_code"] += 1
    assert pace.eager()
    now[0] += ANNOUNCED_EAGER_S * 1.01
    assert not pace.eager()
