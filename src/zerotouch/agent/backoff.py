"""Exponential backoff with full jitter, honouring a server's Retry-After."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 60.0
    rand: random.Random = random.Random()

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 0)."""
        jittered = self.rand.uniform(0, min(self.cap, self.base * (2 ** attempt)))
        if retry_after is not None:
            # Never earlier than the server asked; a little jitter so a fleet does not return at once.
            return min(max(retry_after, 0) + self.rand.uniform(0, max(1.0, retry_after) * 0.2), self.cap * 10)
        return jittered
