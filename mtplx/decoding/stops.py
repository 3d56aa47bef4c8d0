"""Stop rules: stop strings that may span tokens, stop ids / EOS, length.

`StopStrings` sits between the incremental detokenizer and the caller: it releases text as
soon as it can no longer be the start of a stop string, holds back the rest, and on a match
returns the text before the stop string (the stop string itself is never emitted).
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""  # text received but not released yet
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def feed(self, delta: str) -> tuple[str, bool]:
        """Append a text delta -> (text safe to release now, stopped)."""
        if not self.stops:
            return delta, False
        buf = self.held + delta
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            i, self.matched = min(hits)
            self.held = ""
            return buf[:i], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held text at the end of a generation that did not hit a stop string."""
        out, self.held = self.held, ""
        return out


def stop_token_set(eos_token_ids, stop_token_ids, ignore_eos: bool) -> frozenset[int]:
    ids = set(int(t) for t in stop_token_ids)
    if not ignore_eos:
        ids |= set(int(t) for t in eos_token_ids)
    return frozenset(ids)
