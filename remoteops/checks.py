"""The precheck check: a probe that runs on the server and a verdict on the laptop.

A check's ``probe`` is Python source defining ``probe(ctx)``. Every check's
probe is sent to the server in one script and run by its plain ``python3``
(remoteops need not be installed there), so probes use only the standard
library and import anything else inside ``try``. ``ctx`` holds
``project_root``, ``datasets`` and the ``settings`` dict. The JSON-able value
``probe`` returns (or ``{"error": ...}`` when it raised) is passed to
``evaluate`` on the laptop, which returns one or more ``CheckResult``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
STATUSES = (OK, WARN, FAIL, SKIP)


@dataclass
class CheckResult:
    """One row of the precheck table."""

    name: str
    status: str
    value: str = ""
    hint: str = ""
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Check:
    """Base class for precheck checks; plugins subclass it and register instances."""

    name: ClassVar[str] = ""
    probe: ClassVar[str | None] = None

    def evaluate(self, value: Any, settings: Any) -> CheckResult | list[CheckResult]:
        raise NotImplementedError

    def result(self, status: str, value: str = "", hint: str = "", name: str | None = None,
               **kw: Any) -> CheckResult:
        """A row for this check; ``name`` overrides the row's name (one check, many rows)."""
        return CheckResult(name or self.name, status, value, hint, **kw)

    def ok(self, value: str = "", hint: str = "", **kw: Any) -> CheckResult:
        return self.result(OK, value, hint, **kw)

    def warn(self, value: str = "", hint: str = "", **kw: Any) -> CheckResult:
        return self.result(WARN, value, hint, **kw)

    def fail(self, value: str = "", hint: str = "", **kw: Any) -> CheckResult:
        return self.result(FAIL, value, hint, **kw)

    def skip(self, value: str = "", hint: str = "", **kw: Any) -> CheckResult:
        return self.result(SKIP, value, hint, **kw)
