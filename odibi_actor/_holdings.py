"""What a run's scheduler knows of its datasets beyond their values: which are kept on
which worker (as :class:`~._dataplane.Ref`), which may be freed, and which done nodes
must run again when a worker that held their outputs is gone.

Sans-I/O, like :class:`~._state.RunState`: the scheduler acts on what it returns. Nothing
here is built for a run that never keeps data on workers and asks for every output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._dag import DAGNode
from ._dataplane import Ref
from ._messages import DataLost
from ._state import RunState, State


class Holdings:
    def __init__(
        self,
        nodes: Mapping[str, DAGNode],
        data: dict[str, Any],
        state: RunState,
        requested: frozenset[str] | None = None,
        may_drop: bool = True,
    ) -> None:
        self.nodes, self.data, self.state = nodes, data, state
        self.requested = requested
        # free what no consumer needs any more: only when not everything is asked for
        self.may_drop = requested is not None and may_drop
        self.by_owner: dict[bytes, set[str]] = {}
        self.kept = self.kept_bytes = 0  # outputs kept on workers, as they arrived
        self._left: dict[str, int] = {}  # dataset -> consumers still to finish with it
        self._producer: dict[str, str] | None = None
        self._consumers: dict[str, list[str]] | None = None

    def _index(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        if self._producer is None or self._consumers is None:
            producer: dict[str, str] = {}
            consumers: dict[str, list[str]] = {}
            for node in self.nodes.values():
                for out in node.outputs:
                    producer[out] = node.name
                for i in node.inputs:
                    consumers.setdefault(i, []).append(node.name)
            self._producer, self._consumers = producer, consumers
        return self._producer, self._consumers

    def done(self, node: DAGNode) -> list[Ref]:
        """``node`` finished and its outputs are in ``data`` (bytes, or a Ref to where a
        worker keeps them). Frees its inputs that no one needs any more and nobody asked
        for, and its outputs if nothing reads them; returns the freed ones kept on
        workers, whose holders must be told. One call per node, cheap when idle."""
        data = self.data
        for name in node.outputs:
            value = data[name]
            if type(value) is Ref:
                self.by_owner.setdefault(value.owner, set()).add(name)
                self.kept += 1
                self.kept_bytes += value.nbytes
        if not self.may_drop:
            return []
        status = self.state.status
        consumers = self._index()[1]
        for name in node.outputs:
            if name not in self.requested:  # type: ignore[operator]
                readers = consumers.get(name, ())
                self._left[name] = sum(1 for c in readers if status(c).state is not State.DONE)
        freed: list[Ref] = []
        for name in node.inputs:
            left = self._left.get(name)
            if left is None:
                continue  # initial data, or asked for
            if left > 1:
                self._left[name] = left - 1
                continue
            self._free(name, freed)
        for name in node.outputs:
            if self._left.get(name) == 0:  # no consumer: nothing will ever read it
                self._free(name, freed)
        return freed

    def _free(self, name: str, freed: list[Ref]) -> None:
        """Only kept outputs are freed: a small value costs the coordinator little, and
        dropping it would make losing a later dataset rerun its producer too."""
        del self._left[name]
        value = self.data.get(name)
        if type(value) is Ref:
            del self.data[name]
            self.by_owner.get(value.owner, set()).discard(name)
            freed.append(value)

    def lost(self, message: DataLost) -> list[str]:
        """Forget the kept datasets ``message`` says are gone; returns their names."""
        data, gone = self.data, []
        if message.owner is not None:
            for name in self.by_owner.pop(message.owner, ()):
                value = data.get(name)
                if type(value) is Ref and value.owner == message.owner:
                    del data[name]
                    gone.append(name)
        for name in message.names or ():
            value = data.get(name)
            if type(value) is Ref and value.endpoint == message.endpoint:
                del data[name]
                self.by_owner.get(value.owner, set()).discard(name)
                gone.append(name)
        return gone

    def to_rerun(self, gone: list[str]) -> list[str]:
        """The done nodes to run again for lost datasets someone still needs: their
        producers, and any done ancestor whose output is gone too (freed or lost)."""
        producer, consumers = self._index()
        status = self.state.status
        todo = [
            producer[name]
            for name in gone
            if name in producer
            and (
                self.requested is None
                or name in self.requested
                or any(status(c).state is not State.DONE for c in consumers.get(name, ()))
            )
        ]
        out: list[str] = []
        seen: set[str] = set()
        while todo:
            p = todo.pop()
            if p in seen or status(p).state is not State.DONE:
                continue
            seen.add(p)
            out.append(p)
            for i in self.nodes[p].inputs:
                if i not in self.data:
                    if i in producer:
                        todo.append(producer[i])
                elif i in self._left:
                    self._left[i] += 1  # needed once more, by p
        return out
