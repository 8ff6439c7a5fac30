"""What ``edgesparse serve`` can be told: bind address, access control and resource bounds."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ...errors import InvalidOptionError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None             # required as "Authorization: Bearer KEY" when set
    allowed_hosts: list[str] = field(default_factory=list)   # extra Host names accepted on loopback
    cors_origins: list[str] = field(default_factory=list)    # browser origins allowed to call the API
    max_body_mb: float = 2.0               # request bodies above this get 413 (read no further)
    max_queue: int = 128                   # queued + running jobs above this get 503
    stall_timeout_s: float = 60.0          # /health says "degraded" after this long without progress
    body_timeout_s: float = 30.0           # a body that trickles in slower than this gets 408
    header_timeout_s: float = 10.0         # a connection whose request headers take longer is closed
    shutdown_grace_s: int = 5              # SIGTERM: streams get their final event, then we exit
    parallel: int = 1                      # requests decoded at once (continuous batching above 1)

    def validate(self) -> "ServeOptions":
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InvalidOptionError(f"port must be in 1..65535, got {self.port}")
        if not 0 < self.max_body_mb <= 1024:
            raise InvalidOptionError(f"max body size must be in (0, 1024] MB, got {self.max_body_mb}")
        if self.max_queue < 1:
            raise InvalidOptionError(f"max queue must be >= 1, got {self.max_queue}")
        if not isinstance(self.parallel, int) or not 1 <= self.parallel <= 64:
            raise InvalidOptionError(f"parallel slots must be in 1..64, got {self.parallel}")
        if not self.stall_timeout_s > 0 or not self.body_timeout_s > 0 or not self.header_timeout_s > 0:
            raise InvalidOptionError("timeouts must be positive")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise InvalidOptionError("the API key must be a non-empty string without spaces")
        for o in self.cors_origins:
            if o != "*" and not o.startswith(("http://", "https://")):
                raise InvalidOptionError(f"a CORS origin looks like http://host[:port], got {o!r}")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def host_allowed(self, host_header: str | None) -> bool:
        """A loopback server answers only to loopback names (and --allowed-host): a page on
        evil.example that rebinds its DNS to 127.0.0.1 still sends ``Host: evil.example``."""
        if not self.loopback and not self.allowed_hosts:
            return True
        if not host_header:
            return False
        name = host_header.strip().lower()
        if name.startswith("["):               # [::1]:8000
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":")[0]
        allowed = set(self.allowed_hosts) | (set(LOOPBACK_NAMES) if self.loopback else set())
        return name in {h.lower() for h in allowed}
