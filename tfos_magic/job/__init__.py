"""Jobs: the spec a notebook registers and the on-disk store that outlives the kernel."""

from .spec import JobSpec, RunOrigin, TrainOptions
from .store import JobStore, default_home
from .job import Job

__all__ = ["Job", "JobSpec", "JobStore", "RunOrigin", "TrainOptions", "default_home"]
