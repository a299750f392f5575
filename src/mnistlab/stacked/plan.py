"""Which of a sweep's trials train together: stackable trials with equal group keys, in stacks capped by a knob and
by available memory; the rest one at a time. Every decision is logged."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from mnistlab.stacked.fit import group_key, stack_problem

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


def plan(cfgs: list[DictConfig], max_members: int, mem_per_member_mb: float) -> tuple[list[list[int]], list[int]]:
    """(stacks as lists of indices into cfgs, indices trained one at a time)."""
    cap = member_cap(max_members, mem_per_member_mb)
    alone: list[int] = []
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        why = stack_problem(cfg)
        if why:
            log.info("trial %s trains on its own, not stacked: %s", cfg.hydra.job.num, why)
            alone.append(i)
        else:
            by_key.setdefault(group_key(cfg), []).append(i)
    groups = []
    for members in by_key.values():
        n = -(-len(members) // cap)  # as few stacks as the cap allows, of even sizes
        groups += [members[k::n] for k in range(n)]
    for g in groups:
        if len(g) == 1:
            log.info("trial %s trains on its own: no other trial shares its data, model and trainer settings",
                     cfgs[g[0]].hydra.job.num)
    alone += [g[0] for g in groups if len(g) == 1]
    groups = [g for g in groups if len(g) > 1]
    log.info("launcher=stacked: %d trials in %d stack(s) of %s, %d on their own",
             sum(map(len, groups)), len(groups), [len(g) for g in groups], len(alone))
    return groups, alone
