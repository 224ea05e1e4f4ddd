"""The per-process caches of loaded models, and the registry that clears them all.

A bottom module: it imports nothing of lqae_sklearn, so that the autoencoders'
caches (:mod:`lqae_sklearn._loading`) and the LLMs' (:mod:`lqae_sklearn.llm._cache`)
both build on it without importing each other. Every :class:`ModelCache` registers
itself on creation; :func:`clear_all` empties every one that exists, including the
LLMs' when :mod:`lqae_sklearn.llm` was imported (and none when it was not).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Hashable

# Weak, so that a cache made and dropped (in a test, say) leaves the registry with it.
_REGISTRY: "weakref.WeakSet[ModelCache]" = weakref.WeakSet()


class ModelCache:
    """Loaded models by key: at most ``max_items``, the least recently used dropped first.

    A dropped model stays alive as long as something still holds it; the cache
    only stops handing it out.
    """

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.RLock()
        _REGISTRY.add(self)

    def get(self, key: Hashable, load: Callable[[], object], key_of: Callable[[object], Hashable] | None = None):
        """The model under ``key``, calling ``load()`` (under the lock, once) when it is missing.

        ``key_of(model)`` gives the key a freshly loaded model truly has (what was
        read, not what the caller expected to read): the model is filed under that
        key, so that the cache never hands out one model under another's key. The
        caller compares it with ``key`` when it must.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = load()
            self._items[key if key_of is None else key_of(value)] = value
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            return value

    def items(self) -> list:
        """A snapshot of the (key, model) pairs, least recently used first."""
        with self._lock:
            return list(self._items.items())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items


def clear_all() -> None:
    """Empty every :class:`ModelCache` of this process."""
    for cache in list(_REGISTRY):
        cache.clear()
