"""The block-node tests' shared helpers: they live in ``pynbd.testing.support`` (where
plugin authors' tests reach them too) and are re-exported here under their old
names."""

from __future__ import annotations

from pynbd.testing.support import (
    CHUNK,
    DATA,
    HOLE,
    KIB,
    LAYERS,
    MIB,
    MODEL_SIZE,
    WINDOW_START,
    WINDOW_TAIL,
    Layer,
    Stack,
    assert_no_hole,
    assert_old_or_zero,
    build_faults,
    build_faults_idle,
    build_node,
    build_raw,
    build_stack,
    build_window,
    check_extents,
    check_guards,
    current_loop,
    first_difference,
    idle_rules,
    outcome,
    pattern,
    raises_errno,
    read,
    run,
    shared_loop,
    start_read,
    start_write,
)

__all__ = [
    "CHUNK", "DATA", "HOLE", "KIB", "LAYERS", "MIB", "MODEL_SIZE", "WINDOW_START",
    "WINDOW_TAIL", "Layer", "Stack", "assert_no_hole", "assert_old_or_zero", "build_faults",
    "build_faults_idle", "build_node", "build_raw", "build_stack", "build_window",
    "check_extents", "check_guards", "current_loop", "first_difference", "idle_rules",
    "outcome", "pattern", "raises_errno", "read", "run", "shared_loop", "start_read",
    "start_write",
]
