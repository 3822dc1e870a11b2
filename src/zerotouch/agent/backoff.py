"""Exponential backoff with full jitter, honouring a server's Retry-After."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 60.0
    rand: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            # Never earlier than the server asked; up to 20 % later so a fleet that was told the
            # same Retry-After does not come back in one burst.
            ra = max(float(retry_after), 0.0)
            return ra + self.rand.uniform(0, max(1.0, ra) * 0.2)
        # The exponent is capped before the power: 2**1024 does not fit a float.
        bound = self.cap if attempt >= 62 else min(self.cap, self.base * 2.0 ** attempt)
        return self.rand.uniform(0, bound)
