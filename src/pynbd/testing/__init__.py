"""Test helpers for storage plugins and block nodes (pytest and hypothesis needed).

- ``pynbd.testing.plugin_contract.PluginContract``: the contract a storage plugin
  keeps, as a test class to subclass (``docs/plugins.md``);
- ``pynbd.testing.contract.NodeContract``: the contract every block node keeps,
  with its state machine (``machine``) and helpers (``support``);
- ``pynbd.testing.httpserver.RangeServer``: a small HTTP file server that
  honours range requests, for plugins that read over HTTP.

Rules of this package: pynbd's run time never imports it; it may import any of
pynbd, pytest and hypothesis.  Importing the package itself imports nothing.
"""

from __future__ import annotations
