"""Tasks the beat tests schedule (imported by the beat processes through ``imports``)."""

from django_celery_adv.locks import LockedTask, locked
from django_celery_adv.registry import apps


class LockedJob(LockedTask):
    """A periodic task with a mutex: beat skips it while the lock is held."""

    name = "beat_tests.locked_job"
    lock_name = "beat-test-locked-job"

    def locked_run(self) -> str:
        return "ran"


locked_job = apps["default"].register_task(LockedJob())


@apps["default"].task(name="beat_tests.locked_function")
@locked("beat-test-locked-function")
def locked_function() -> str:
    """The same with the decorator: beat finds the lock on the task's ``run``."""
    return "ran"


@apps["global"].task(name="beat_tests.global_job")
def global_job() -> str:
    return "global"
