"""TE's recipe records, as far as the tests use them."""

import dataclasses


@dataclasses.dataclass
class DelayedScaling:
    margin: int = 0
    amax_history_len: int = 1024
