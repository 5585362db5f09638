"""A scripted Spark for the driver's unit tests: the `SparkBackend` the supervisor and
the launcher's checks talk to, with job groups whose activity, results and failures a
test sets by hand. Decisions that took minute-long Spark runs to test (when the
start-up clock starts, when a starved job fails, when the PS job starts, what a stop
cancels) are tested against it in milliseconds; the real runs stay beside them.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from tfos_magic.driver.spark_backend import DriverAddresses, GpuRequest, GroupActivity, SparkBackend


class Cancelled(RuntimeError):
    """What a fake action raises when its group is cancelled (Spark's "Job cancelled")."""


class FakeAction:
    """A Spark action that runs until the test ends it (`finish`, `fail`) or its group is
    cancelled."""

    def __init__(self, result: Any = None) -> None:
        self.result = result
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.started = threading.Event()

    def finish(self, result: Any = None) -> None:
        if result is not None:
            self.result = result
        self.ended.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ended.set()

    def __call__(self) -> Any:
        self.started.set()
        if not self.ended.wait(30):
            raise TimeoutError("a fake Spark action was never ended")
        if self.error is not None:
            raise self.error
        return self.result


class FakeSpark(SparkBackend):
    def __init__(self, master: str = "spark://fake:7077", slots: int = 4,
                 profile_slots: int | None = None) -> None:
        self.master = master
        self.slots, self.profile_slots = slots, profile_slots
        self.activities: dict[str, GroupActivity] = {}
        self.cancelled: list[str] = []
        self.groups_run: list[str] = []
        self._actions: dict[str, FakeAction] = {}
        self.barrier_reports: list[str] = []
        self.age = 3600.0  # a settled session: its executors have registered
        self.settings_given: dict[str, str] = {}
        self.shipped: list[tuple[str, str]] = []

    def set_activity(self, group: str, done: int, total: int, running: int) -> None:
        self.activities[group] = GroupActivity(done, total, running)

    def run_in_group(self, group: str, description: str, action: Callable[[], Any]) -> Any:
        self.groups_run.append(group)
        if isinstance(action, FakeAction):
            self._actions[group] = action
        return action()

    def activity(self, group: str) -> GroupActivity | None:
        return self.activities.get(group)

    def cancel(self, group: str) -> None:
        self.cancelled.append(group)
        action = self._actions.get(group)
        if action is not None and not action.ended.is_set():
            action.fail(Cancelled(f"Job group {group} cancelled"))

    def feed_frame(self, df: Any, workers: int) -> Any:
        return df

    def partitions_text(self, df: Any) -> str:
        return "its shuffles decide the partitions when it runs"

    def task_slots(self, profile: Any = None) -> int:
        return self.slots if profile is None or self.profile_slots is None else self.profile_slots

    def session_age(self) -> float:
        return self.age

    def addresses(self) -> DriverAddresses:
        return DriverAddresses("127.0.0.1", "127.0.0.1", None if not self.local else "127.0.0.1")

    def barrier_tasks(self, count: int, fn: Callable[[], str]) -> Callable[[], list[str]]:
        reports = self.barrier_reports
        return FakeAction(result=reports) if not reports else (lambda: list(reports))

    def gpu_request(self, gpus: int) -> GpuRequest:
        return GpuRequest(profile=("gpu", gpus))

    def map_in_arrow(self, df: Any, fn: Callable[..., Any], schema: str, profile: Any = None) -> Any:
        raise NotImplementedError("the fake runs no stages")

    def conf(self, key: str, default: str | None = None) -> str | None:
        return self.settings_given.get(key, default)

    def settings(self) -> dict[str, str]:
        return dict(self.settings_given)

    def ship_py_file(self, path: str) -> None:
        self.shipped.append(("pyfile", path))

    def ship_archive(self, uri: str, alias: str) -> None:
        self.shipped.append(("archive", f"{uri}#{alias}"))

    def ui_url(self) -> str | None:
        return None
