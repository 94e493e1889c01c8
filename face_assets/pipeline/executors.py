"""Dask execution of the graph's steps: dagster-dask's executor, made to work with concurrency pools.

Needs the optional ``distributed`` extra (``pip install 'face_assets[distributed]'``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections.abc import Iterator, Mapping
from typing import Any

import dask.distributed
import yaml
from dagster import DagsterEvent, DagsterInstance, executor, multiple_process_executor_requirements
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import ConfigurableClassData
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster_dask.executor import DaskExecutor, get_dask_resource_requirements, query_on_dask_worker
from dagster_dask.executor import dask_executor as _upstream_dask_executor

from .resources import FaceAssetsResource

RESOURCE_KEY = "face_assets"
"""Name the graph's assets use for :class:`FaceAssetsResource`."""

POOL_POLL_SECONDS = 1.0
"""How often a step waiting for a pool slot asks the instance again."""


def _run_step(dependencies: list, payload: bytes, pool: str | None) -> bytes:
    """Dask task: unpack one step's arguments and run it with dagster-dask's worker function.

    A step in a concurrency pool first takes a slot of that pool from the Dagster instance, as
    Dagster's own executors do, and waits while the pool is full; so the pool limit holds across
    Dask workers and across runs on other executors. The step's events come back pickled: Dask
    cannot size Dagster's event records and warned about each one ("Sizeof calculation ... failed").
    """
    recon_job, run, run_config, step_keys, instance_ref, known_state = pickle.loads(payload)
    if pool is None:
        events = query_on_dask_worker(dependencies, recon_job, run, run_config, step_keys, instance_ref, known_state)
        return pickle.dumps(events)
    with DagsterInstance.from_ref(instance_ref) as instance, InstanceConcurrencyContext(instance, run) as slots:
        while not slots.claim(pool, step_keys[0]):
            time.sleep(POOL_POLL_SECONDS)
        try:
            events = query_on_dask_worker(dependencies, recon_job, run, run_config, step_keys, instance_ref,
                                          known_state)
        finally:
            slots.free_step(step_keys[0])
    return pickle.dumps(events)


def _absolute_paths(config: Any, key: str | None = None) -> Any:
    if isinstance(config, Mapping):
        return {k: _absolute_paths(v, k) for k, v in config.items()}
    if key == "base_dir" and isinstance(config, str) and not os.path.isabs(config):
        return os.path.abspath(config)
    return config


def portable_instance_ref(ref: InstanceRef) -> InstanceRef:
    """``ref`` with every storage folder absolute, as the run's process resolves it.

    The project's ``dagster.yaml`` keeps its storage under ``data/dagster``, relative to the folder
    Dagster runs in. A Dask worker started in another folder would resolve that against its own
    folder and write the run's events into an empty instance of its own (where the run's partition
    does not exist, so the step fails); with absolute folders it writes into the run's instance.
    Storage without folders (PostgreSQL) is unchanged.
    """
    fields = {}
    for name in ref._fields:
        data = getattr(ref, name)
        if isinstance(data, ConfigurableClassData):
            config = yaml.safe_load(data.config_yaml)
            fields[name] = data._replace(config_yaml=yaml.safe_dump(_absolute_paths(config)))
    return ref._replace(**fields)


def portable_run_config(run_config: Mapping[str, Any], resolved: ResolvedRunConfig) -> dict[str, Any]:
    """``run_config`` with the face_assets resource's settings inline, as resolved in the run's process.

    A Dask worker rebuilds the job from its own environment and may have neither the config file
    nor the ``FACE_ASSETS_*`` variables the run was launched with; with the settings in the run
    config its steps see exactly the run's settings.
    """
    resource = resolved.resources.get(RESOURCE_KEY)
    if resource is None:
        return dict(run_config)
    portable = FaceAssetsResource(**(resource.config or {})).portable()
    resources = dict(run_config.get("resources") or {})
    resources[RESOURCE_KEY] = {"config": portable}
    return {**run_config, "resources": resources}


class PoolSafeDaskExecutor(DaskExecutor):
    """dagster-dask's executor for runs whose steps use concurrency pools or partitions.

    Dask (2025 and later) walks the tuple arguments of a submitted task, and a Dagster run carries
    records that refuse iteration (its pool summary, its partition subset), so the upstream
    executor fails before any step starts. Here each step's arguments travel pickled, as bytes
    Dask does not look into; the worker runs the step with upstream's own function. Upstream also
    ignores concurrency pools; here a pooled step claims its slot from the instance before it runs.
    Task keys carry the run id, so concurrent runs of the job do not collide on the cluster.

    Upstream runs the workers on the run config as launched; here the face_assets settings travel
    inline in it (:func:`portable_run_config`), so workers need no copy of the config file, and the
    instance's storage folders travel absolute (:func:`portable_instance_ref`), so workers started in
    any folder of the same host write into the run's instance.

    Clusters: ``existing`` (a scheduler address: the way to use a cluster that Kubernetes, YARN or
    a batch system runs) and ``local`` (a cluster started for the run and closed after it).
    """

    def execute(self, plan_context, execution_plan) -> Iterator[DagsterEvent]:
        """Submit every step to the cluster, each after the steps it depends on; yield their events."""
        if not plan_context.instance.is_persistent:
            raise ValueError("Dask execution requires a persistent DagsterInstance (set DAGSTER_HOME)")
        job_name, run = plan_context.job_name, plan_context.dagster_run
        instance_ref = portable_instance_ref(plan_context.instance.get_ref())
        run_config = portable_run_config(plan_context.run_config,
                                         ResolvedRunConfig.build(plan_context.job.get_definition(),
                                                                 plan_context.run_config))
        with contextlib.ExitStack() as stack:
            if self.cluster_type == "existing":
                cluster = self.cluster_configuration["address"]
            elif self.cluster_type == "local":
                cluster = stack.enter_context(dask.distributed.LocalCluster(**self.build_dict(job_name)))
            else:
                raise ValueError(f"cluster type {self.cluster_type!r}: start that cluster with its own tooling "
                                 "and give its scheduler as cluster: {existing: {address: ...}}")
            client = stack.enter_context(dask.distributed.Client(cluster))
            futures = {}
            for level in execution_plan.get_steps_to_execute_by_level():
                for step in level:
                    # A re-execution runs a subset of the steps: the others' outputs come from the parent run.
                    upstream = [futures[key] for step_input in step.step_inputs
                                for key in step_input.dependency_keys if key in futures]
                    payload = pickle.dumps((plan_context.reconstructable_job, run, run_config,
                                            [step.key], instance_ref, execution_plan.known_state))
                    futures[step.key] = client.submit(
                        _run_step, upstream, payload, step.pool, key=f"{job_name}.{step.key}.{run.run_id}",
                        pure=False, resources=get_dask_resource_requirements(step.tags))
            for _, events in dask.distributed.as_completed(list(futures.values()), with_results=True):
                yield from pickle.loads(events)


@executor(name="dask", config_schema=_upstream_dask_executor.config_schema,
          requirements=multiple_process_executor_requirements())
def dask_executor(init_context) -> PoolSafeDaskExecutor:
    """Steps as Dask tasks: ``cluster: {existing: {address: "tcp://scheduler:8786"}}`` or ``{local: {...}}``."""
    ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
    return PoolSafeDaskExecutor(cluster_type, cluster_configuration)
