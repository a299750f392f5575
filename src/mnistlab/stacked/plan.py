"""Which of a sweep's trials train together: stackable trials with equal group keys, in stacks capped by a knob and
by available memory; the rest one at a time. Every decision is logged."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from mnistlab.config import task_config
from mnistlab.data.preprocess import read_data_checksum
from mnistlab.paths import resolve
from mnistlab.stacked.fit import group_key, stack_problem
from mnistlab.tracking.resume import config_hash, find_finished
from mnistlab.tracking.store import open_store

log = logging.getLogger("mnistlab.stacked")
MIB = 1024**2


def member_cap(max_members: int, mem_per_member_mb: float) -> int:
    """At most `max_members` per stack, and no more than available memory / one member's cost."""
    import psutil

    available = psutil.virtual_memory().available
    by_memory = max(1, int(available // (mem_per_member_mb * MIB)))
    if by_memory < max_members:
        log.warning("stacks of at most %d trials, not %d: %.0f MB available / %.0f MB per member "
                    "(hydra.launcher.mem_per_member_mb)", by_memory, max_members, available / MIB, mem_per_member_mb)
    return max(1, min(max_members, by_memory))


def _finished_run_finder(root):
    """A function trial config -> the FINISHED run its job will copy instead of training (reuse_finished,
    tracking/resume.py), or None. The data checksum and each store are read once per sweep, not once per trial."""
    from functools import cache

    from mlflow import MlflowClient

    @cache
    def checksum(processed_dir: str) -> str:
        return read_data_checksum(resolve(processed_dir, root))

    @cache
    def store(mlruns_dir: str, tracking_uri: str | None, experiment: str):
        uri, exp_id = open_store(mlruns_dir, tracking_uri, experiment, root)
        return MlflowClient(uri), exp_id

    def reused_run(cfg: DictConfig) -> str | None:
        if not (cfg.get("reuse_finished") and cfg.logger.enabled):
            return None
        client, exp_id = store(cfg.paths.mlruns_dir, cfg.logger.tracking_uri, cfg.logger.experiment_name)
        task_cfg = task_config(cfg)
        run = find_finished(client, exp_id, config_hash(task_cfg, checksum(cfg.data.processed_dir)))
        return run.info.run_id if run else None

    return reused_run


def plan(cfgs: list[DictConfig], max_members: int, mem_per_member_mb: float, root,
         workers: int = 1) -> tuple[list[list[int]], list[int]]:
    """(stacks as lists of indices into cfgs, indices run one at a time: unstackable, or reused as they are). A group
    is split into at least `workers` stacks (the stack processes run at once), of at least 2 members."""
    cap = member_cap(max_members, mem_per_member_mb)
    reused_run = _finished_run_finder(root)
    alone: list[int] = []
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        why = stack_problem(cfg)
        reused = None if why else reused_run(cfg)
        if reused:
            log.info("trial %s is not stacked: its job reuses FINISHED run %s (reuse_finished)", cfg.hydra.job.num, reused)
            alone.append(i)
            continue
        if why:
            log.info("trial %s trains on its own, not stacked: %s", cfg.hydra.job.num, why)
            alone.append(i)
        else:
            by_key.setdefault(group_key(cfg), []).append(i)
    groups = []
    for members in by_key.values():
        n = max(-(-len(members) // cap), min(workers, len(members) // 2))  # few stacks, even sizes, every worker busy
        # seed-major order, cut in n near-equal runs: members of one seed share their batches (StackedBatches), and a
        # stack with one seed trains its first layer as one wide gemm (StackedMLP.forward). Within a seed every n-th
        # trial goes to the same run, so stacks that run at once get the same mix of optimizers (an RMSprop trial
        # costs twice an SGD one at batch 32), not one the SGD trials and the other the RMSprop ones.
        by_seed: dict[int, list[int]] = {}
        for i in members:
            by_seed.setdefault(int(cfgs[i].seed), []).append(i)
        members = [i for s in sorted(by_seed) for k in range(n) for i in by_seed[s][k::n]]
        groups += [members[k * len(members) // n:(k + 1) * len(members) // n] for k in range(n)]
    for g in groups:
        if len(g) == 1:
            log.info("trial %s trains on its own: no other trial shares its data, model and trainer settings",
                     cfgs[g[0]].hydra.job.num)
    alone += [g[0] for g in groups if len(g) == 1]
    groups = [g for g in groups if len(g) > 1]
    log.info("launcher=stacked: %d trials in %d stack(s) of %s, %d on their own",
             sum(map(len, groups)), len(groups), [len(g) for g in groups], len(alone))
    return groups, alone
