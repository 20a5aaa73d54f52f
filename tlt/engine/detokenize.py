"""Text from tokens: final texts, stop strings on a short tail window, per-token texts for logprobs."""

from __future__ import annotations

import threading


class Detokenizer:
    """Thread-safe wrapper of an HF tokenizer (fast tokenizers must not be used from two threads at once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self.lock:
            return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        with self.lock:
            try:
                return self.tokenizer.decode(
                    ids, skip_special_tokens=skip_special_tokens,
                    spaces_between_special_tokens=spaces_between_special_tokens,
                )
            except TypeError:  # tokenizers without that option
                return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: list[int]) -> list[str]:
        with self.lock:
            return [self.tokenizer.decode([i]) for i in ids]

    def matched_stop(self, output_ids: list[int], stops: list[str], max_stop_len: int) -> str | None:
        """The stop string that the newest token completed, if any (checked on a tail window).

        Every token carries at least one byte, but not always a whole character (byte-level BPE splits
        an emoji into up to 4 tokens), so the window is counted in UTF-8 bytes: a stop string of b bytes
        lies within the last b + 3 tokens when the newest token completes it.
        """
        window = max(max_stop_len, *(len(s.encode("utf-8")) for s in stops)) + 3
        tail = self.decode(output_ids[-window:], skip_special_tokens=False)
        for s in stops:
            if s in tail:
                return s
        return None
