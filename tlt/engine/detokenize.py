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

    def decode(self, ids: list[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> str:
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

        Every token carries at least one character or one byte of one, so a stop string of k characters
        lies within the last k + 3 tokens when the newest token completes it.
        """
        tail = self.decode(output_ids[-(max_stop_len + 3):], skip_special_tokens=False)
        for s in stops:
            if s in tail:
                return s
        return None
