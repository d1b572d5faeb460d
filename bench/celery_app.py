"""The benchmark's Celery app: ``celery -A bench.celery_app worker``."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

app = Celery("bench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["bench"])

# The other systems' workers (bench/compare.py): Celery's own consumer, without the package's consumer steps
# (its guard of held alarm deliveries, which also frees Celery 5.7's fired timer entries of every eta task).
if os.environ.get("BENCH_STOCK_WORKER"):
    import django
    from celery import signals

    django.setup()  # the package's app connects its receivers in ready(): take this one out before worker_init
    signals.worker_init.disconnect(dispatch_uid="celery_scheduller.prompt_prefetch")


# bench/worker_cost.py only: take parts of the result hook out of the worker to see what each costs.
if os.environ.get("BENCH_HOOK") in ("off", "no-write"):
    from celery.signals import worker_process_init, worker_ready

    @worker_ready.connect  # -P threads: the tasks run in this process
    @worker_process_init.connect  # -P prefork: in each pool process, forked before worker_ready
    def _strip_hook(**_: object) -> None:
        from celery import signals

        from celery_scheduller import store

        if os.environ["BENCH_HOOK"] == "off":
            for name in ("prerun", "postrun", "failure"):
                getattr(signals, f"task_{name}").disconnect(dispatch_uid=f"celery_scheduller.{name}")
        else:
            store.finish = lambda *args, **kwargs: True  # type: ignore[assignment]
            store.finish_many = lambda refs: {ref.pk for ref in refs}  # type: ignore[assignment]


# Celery's Django fixup closes every database connection before and after each task, CONN_MAX_AGE or
# not, unless CELERY_DB_REUSE_MAX says after how many tasks (bench/worker_cost.py --connections).
if os.environ.get("BENCH_DB_CONNECTIONS") == "persistent-reuse":
    app.conf.CELERY_DB_REUSE_MAX = 1_000_000
