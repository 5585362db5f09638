"""The stop agreement of training/stopping.py: pure logic, driven step by step. The real
stop (a kernel interrupt, %tfos_stop) runs in test_processes.py."""

from tfos_magic.training.stopping import MIN_LEAD_STEPS, StopSignal


def test_nothing_stops_without_a_request():
    signal = StopSignal(is_chief=True, announce=lambda step: None)
    assert not any(signal.should_stop(step) for step in range(100))


def test_chief_announces_a_step_ahead_and_every_worker_stops_there():
    announced = []
    chief = StopSignal(is_chief=True, announce=announced.append)
    other = StopSignal(is_chief=False, announce=lambda step: None)
    for step in range(1, 5):
        assert not chief.should_stop(step) and not other.should_stop(step)
    chief.on_control({"control": "stop"})
    other.on_control({"control": "stop"})
    assert not other.should_stop(5), "a non-chief waits for the chief's step"
    assert not chief.should_stop(5)
    assert len(announced) == 1 and announced[0] >= 5 + MIN_LEAD_STEPS
    other.on_control({"control": "stop_at", "step": announced[0]})
    stops = [(step, chief.should_stop(step), other.should_stop(step)) for step in range(6, announced[0] + 2)]
    first = [step for step, c, o in stops if c and o]
    assert first[0] == announced[0], stops
    assert all(c == o for _, c, o in stops), "the workers agree on every step"
    assert len(announced) == 1, "announced once"


def test_parameter_server_mode_stops_the_chief_at_once():
    announced = []
    chief = StopSignal(is_chief=True, announce=announced.append, lockstep=False)
    chief.should_stop(10)
    chief.on_control({"control": "stop"})
    assert chief.should_stop(11) and announced == [11]
