"""Local grants: a worker's share of a limit, reserved in Redis ahead of the requests that will use it.

A request admitted through Redis may reserve, beside its own amounts, a grant per check: room for a few more
requests like it (slots, for concurrency). Later requests whose every check has a live grant with room are admitted
in the worker, without a round trip, and settle into their grants without one. What a grant holds counts as used
in Redis from the moment it is reserved, so the workers together never admit more than a limit allows.

What grants cost is headroom withheld: a grant admits only within the sliding-window bucket it was reserved in
(the bucket every request it admits is charged to, as if each had been admitted on its own) and for at most
`GRANT_MS`; then what it did not use goes back. It never takes more than 1/`HEADROOM_SHARE` of the room a limit had
left when last seen, and limits with too little room for that are never granted, so a limit close to exhaustion is
enforced request by request, exactly. A worker that dies holding grants leaves them counted: a window's until it
slides past them, a budget's until its period ends, a concurrency slot's until its lease expires.

Renewal: just after each GRANT_MS period begins, the grants that admitted requests in the period that ended are
asked for again in the background (one admission per scope, their unused room returned in the same round trip), so
a busy key's first request of each period is admitted in the worker too instead of waiting for a round trip.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from gateway.limits.checks import Check, Periods, marker_key, slot_of
from gateway.limits.store import AdmitCall, AdmitResult, Returning, SettleCall

GRANT_MS = 2_000
HEADROOM_SHARE = 16
FIRST_GRANT = 8  # requests' worth; doubled each time a grant runs out within its bucket
# Concurrency slots go back to their grant when a request ends, so a grant needs as many as run at once, not as
# many as requests come: a key's usually one or two. (Each slot is a member Redis adds, and removes if unused.)
FIRST_SLOTS = 2
MAX_GRANT = 512
SWEEPS_PER_SECOND = 4
SWEEP_GRACE = 0.5  # seconds an expired grant waits for its key's next admission to return it, before the sweep does
# How long a check's usage at its last admission is remembered: past it, any grant from that admission has expired
# and been swept, so the key is quiet; forgetting it keeps the memory to the keys in use, however many exist.
SEEN_SECONDS = GRANT_MS / 1000 + SWEEP_GRACE
# Renewals wait this long after a period begins on the store's clock: enough for the worker's estimate of that
# moment (from the store's replies) to be past it, so that the new grants are charged to the new bucket.
RENEW_DELAY = 0.01
_GRANTABLE = frozenset({"sw", "bd", "bm", "cc"})


@dataclass(slots=True, eq=False)
class Grant:
    check: Check  # as reserved: key, kind, limit, p1, p2
    admitted_ms: int  # the store's clock when first reserved: the bucket its requests are charged to
    valid_until: float  # monotonic seconds: admits nothing after
    size: int  # requests' worth last reserved (for doubling)
    remaining: int = 0  # sw/bd/bm: reserved and not yet used (negative: debt, charged on return)
    usage: int = 0  # what the store counted, this grant included, at the last reservation
    free: list[str] = field(default_factory=list)  # cc: slot members given back by the requests that used them
    returned: bool = False
    uses: int = 0  # requests admitted from it in the worker
    # cc: slots never handed out are members `<owner>:1` .. `<owner>:<unissued>`, named only when used (a key's
    # grant holds up to MAX_GRANT slots, and most of them are returned unused).
    owner: str = ""
    unissued: int = 0
    unit: int = 1  # one request's amount, as reserved beside it (the grant's size is in requests' worth)
    peak: int = 0  # cc: the most slots in use at once (a renewal's size)

    @property
    def slots(self) -> int:
        return len(self.free) + self.unissued

    def take_slot(self) -> str:
        in_use = self.size - len(self.free) - self.unissued + 1
        if in_use > self.peak:
            self.peak = in_use
        if self.free:
            return self.free.pop()
        member = f"{self.owner}:{self.unissued}"
        self.unissued -= 1
        return member

    def unused_slots(self) -> list[str]:
        members = self.free + [f"{self.owner}:{slot}" for slot in range(1, self.unissued + 1)]
        self.free, self.unissued = [], 0
        return members


# Per check of an admitted request: the grant it settles into (None: the store), its own check, its cc member.
Taken = list[tuple[Grant | None, Check, str]]


@dataclass(slots=True)
class Renewal:
    """One scope's grants asked for again: an admission of nothing but the grants, all or nothing."""

    call: AdmitCall
    ended: list[Grant | None]  # per check of the call: the grant it renews (None: the slot's budgets marker)
    generation: int  # the limits it was sized for (see `expire_all`)


def _amount(check: Check, tokens: int, cost: int) -> int:
    """What a request takes from a grant of a (non-concurrency) check, given its template."""
    return tokens if check.tokens else cost if check.metric != "requests" else 1


class Grants:
    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall  # for where in its GRANT_MS period a grant would start (the store's clock, near enough)
        self._live: dict[str, Grant] = {}  # check key -> the grant that admits for it now
        self._retired: list[Grant] = []  # superseded by a grant of a newer bucket: to be returned
        # check key -> the store's usage at its last admission, and when; oldest first (swept from the front)
        self._seen: dict[str, tuple[int, float]] = {}
        self._expiries: dict[int, list[Grant]] = {}  # sweep slot -> grants expiring in it (the sweep is O(expired))
        self._generation = 0  # bumped when limits change: renewals sized before that are given back, not kept
        # Where GRANT_MS periods begin on the monotonic clock (the store's clock, as its replies place it), and
        # the start of the last period whose grants were renewed.
        self._phase: float | None = None
        self._renewed_for = -math.inf
        self._renewal_cursor = 0  # sweep slots below it hold no grant still to consider for renewal

    def __len__(self) -> int:
        return len(self._live)

    @property
    def remembered(self) -> int:
        """Checks whose last usage this worker keeps (for sizing grants): those of the keys in use."""
        return len(self._seen)

    # --- admission -----------------------------------------------------------------------------------------

    def admit(self, templates: Sequence[Sequence[Check]], tokens: int, cost: int) -> Taken | None:
        """Admit in the worker if every check has a live grant with room; None: ask the store. The checks are
        templates: a request's amounts are `tokens`, `cost` or one request."""
        now = self._clock()
        live = self._live
        grants = []
        for slot in templates:
            for check in slot:
                kind = check.kind
                if kind == "mk":
                    continue
                grant = live.get(check.key)
                if grant is None or now >= grant.valid_until:
                    return None
                if kind == "cc":
                    if not grant.slots:
                        return None
                    amount = 0
                else:
                    amount = _amount(check, tokens, cost)
                    if grant.remaining < amount:
                        return None
                grants.append((grant, check, amount))
        taken: Taken = []
        for grant, check, amount in grants:
            grant.uses += 1
            if check.kind == "cc":
                taken.append((grant, check, grant.take_slot()))
            else:
                grant.remaining -= amount
                taken.append((grant, check, ""))
        return taken

    def admit_covered(
        self, templates: Sequence[Sequence[Check]], tokens: int, cost: int
    ) -> tuple[Taken, list[list[Check]]]:
        """Take what live grants cover (a team's checks, fed by all its keys, usually are); the rest of each slot,
        with the slot's budgets marker if a budget is among it, goes to the store. Give the takes back with
        `untake` if the store refuses."""
        now = self._clock()
        live = self._live
        taken: Taken = []
        rest: list[list[Check]] = []
        for slot in templates:
            remaining: list[Check] = []
            marker = None
            for check in slot:
                kind = check.kind
                if kind == "mk":
                    marker = check
                    continue
                grant = live.get(check.key)
                if grant is not None and now < grant.valid_until:
                    if kind == "cc":
                        if grant.free or grant.unissued:
                            grant.uses += 1
                            taken.append((grant, check, grant.take_slot()))
                            continue
                    # (`_amount`, inline: this runs for every check of every request)
                    elif grant.remaining >= (
                        amount := tokens if check.tokens else 1 if check.metric == "requests" else cost
                    ):
                        grant.uses += 1
                        grant.remaining -= amount
                        taken.append((grant, check, ""))
                        continue
                remaining.append(check)
            if remaining:
                if marker is not None and any(check.kind in ("bd", "bm") for check in remaining):
                    remaining.insert(0, marker)
                rest.append(remaining)
        return taken, rest

    @staticmethod
    def untake(taken: Taken, tokens: int, cost: int, request_id: str) -> list[SettleCall]:
        """Give back what `admit_covered` took; what a grant returned meanwhile held goes back through the store."""
        refunds = [0 if check.kind == "cc" else -_amount(check, tokens, cost) for _, check, _ in taken]
        return Grants.settle(taken, refunds, request_id, 0)

    def with_grants(
        self, calls: list[AdmitCall], *, extras: bool = True, each: bool = False
    ) -> tuple[list[AdmitCall], list[Grant]]:
        """The calls to send to the store, each check's amount raised by the grant it should also reserve (unless
        not `extras`); and the expired grants of these checks, to return in the same pipeline, ahead of them.
        `each`: a check's grant is of use on its own (`admit_covered`), not only when every check will have one."""
        now = self._clock()
        expired = self._retired
        self._retired = []
        sizes: list[list[int]] = []
        covered = extras
        for call in calls:
            call_sizes = []
            for check in call.checks:
                grant = self._live.get(check.key)
                if grant is not None and now >= grant.valid_until:
                    expired.append(self._live.pop(check.key))
                    size, room = self._grant_size(check, now, grant, live=False)
                else:
                    size, room = self._grant_size(check, now, grant, live=grant is not None)
                covered = covered and (size > 0 or room)
                call_sizes.append(size)
            sizes.append(call_sizes)
        sent = calls
        if (covered or (each and extras)) and any(any(call_sizes) for call_sizes in sizes):
            sent = [
                AdmitCall(
                    [
                        replace(check, amount=check.amount + extra) if extra else check
                        for check, extra in zip(call.checks, call_sizes, strict=True)
                    ],
                    call.request_id,
                    call.periods,
                    call.clamp_completion,
                    call.prompt_estimate,
                )
                for call, call_sizes in zip(calls, sizes, strict=True)
            ]
        for grant in expired:
            grant.returned = True  # from now on, requests admitted from it settle in the store
        return sent, expired

    def _grant_size(self, check: Check, now: float, grant: Grant | None, *, live: bool) -> tuple[int, bool]:
        """The grant to ask for beside this request, and whether the check has room in a live grant already."""
        if check.kind == "mk":
            return 0, True
        unit = 1 if check.kind == "cc" else check.amount
        if unit <= 0:
            return 0, True  # costs nothing: an empty grant will do (`_free_of_charge`)
        if check.kind not in _GRANTABLE or (check.kind in ("bd", "bm") and check.p2 == 0):
            return 0, False  # soft budgets refuse nothing, so they are charged as they go
        seen = self._seen.get(check.key)
        if seen is None:
            return 0, False
        usage, seen_at = seen
        requests = FIRST_SLOTS if check.kind == "cc" else FIRST_GRANT
        if grant is not None and live:
            room = grant.slots if check.kind == "cc" else grant.remaining // unit
            if room * 4 >= grant.size:
                return 0, True  # still has room: this request came here for another check's sake
            requests = min(grant.size * 2, MAX_GRANT)
        elif (grant is None or not grant.uses) and now - seen_at > self._life_left():
            return 0, False  # at its pace, the key's next request would come after a grant made now expired
        size = min(unit * requests, (check.limit - usage) // HEADROOM_SHARE)
        return (size, False) if size >= 2 * unit else (0, False)

    def _life_left(self) -> float:
        """Seconds a grant reserved now would live: grants end on a multiple of GRANT_MS of the store's clock,
        which the worker's wall clock matches closely enough to judge whether a key would use one in time."""
        return (GRANT_MS - self._wall() * 1000 % GRANT_MS) / 1000

    def take(
        self, sent: Sequence[AdmitCall], own: Sequence[AdmitCall], results: Sequence[AdmitResult], request_id: str
    ) -> Taken:
        """Keep the grants an admission reserved beside its request, whose results then read as its own; the
        request settles into the live grants of its checks (same bucket: the same as settling in the store)."""
        now = self._clock()
        taken: Taken = []
        for sent_call, own_call, result in zip(sent, own, results, strict=True):
            for index, (check, mine) in enumerate(zip(sent_call.checks, own_call.checks, strict=True)):
                if check.kind == "mk":
                    continue
                extra = check.amount - mine.amount
                if extra and check.tokens and result.granted:
                    extra = 0  # clamped: the store reserved the clamped amount, no grant
                usage = result.values[index]
                self._seen.pop(check.key, None)  # to the back: the dict stays in order of admission
                self._seen[check.key] = (usage, now)
                grant = self._live.get(check.key)
                # What the request's headers report: the store's count without this worker's unused grants.
                result.values[index] = usage - extra - (self._held(grant) if grant is not None else 0)
                if extra or (grant is None and self._free_of_charge(mine, usage)):
                    grant = self._keep(check, extra, result.now_ms, sent_call, now, usage)
                elif grant is not None and self._same_bucket(grant, result.now_ms):
                    grant.usage = usage
                else:
                    grant = None
                taken.append((grant, mine, request_id if check.kind == "cc" else ""))
        return taken

    def _keep(
        self, check: Check, extra: int, admitted_ms: int, call: AdmitCall, now: float, usage: int, unit: int = 0
    ) -> Grant:
        # Every grant ends on a multiple of GRANT_MS (and a window's at its bucket's end), so the grants of one
        # key end together and its next admission through Redis renews them all at once.
        ttl_ms = GRANT_MS - admitted_ms % GRANT_MS
        self._phase = now + ttl_ms / 1000  # (modulo GRANT_MS) where periods begin on this worker's clock
        if check.kind == "sw":
            ttl_ms = min(ttl_ms, (admitted_ms // check.p2 + 1) * check.p2 - admitted_ms)
        elif check.kind == "cc":
            ttl_ms = min(ttl_ms, check.p1 // 2)  # well inside the slots' lease
        else:
            period_end = call.periods.day_end if check.kind == "bd" else call.periods.month_end
            ttl_ms = min(ttl_ms, period_end - admitted_ms)
        unit = unit or (1 if check.kind == "cc" else max(check.amount - extra, 1))
        slots = extra if check.kind == "cc" else 0
        grant = self._live.get(check.key)
        # New concurrency slots never join a grant: a slot expires a lease after it was reserved, so a grant kept
        # alive by top-ups would end up holding slots Redis has dropped.
        if grant is not None and (check.kind == "cc" or not self._same_bucket(grant, admitted_ms)):
            self._retired.append(grant)
            grant = None
        if grant is None:
            grant = self._live[check.key] = Grant(
                check,
                admitted_ms,
                now + ttl_ms / 1000,
                extra // unit,
                remaining=extra - slots,
                usage=usage,
                owner=call.request_id,
                unissued=slots,
                unit=unit,
            )
            self._expire_at(grant)
            return grant
        grant.remaining += extra  # a window or budget topped up in its bucket (slots never join: see above)
        grant.usage = usage
        grant.unit = unit
        grant.size = extra // unit
        grant.valid_until = now + ttl_ms / 1000
        return grant

    @staticmethod
    def _free_of_charge(check: Check, usage: int) -> bool:
        """A check the request costs nothing in (an unpriced model's spend) needs an empty grant, not a round trip,
        while the limit is not reached (what the store would answer)."""
        return check.amount == 0 and check.kind in ("sw", "bd", "bm") and check.p2 != 0 and usage < check.limit

    @staticmethod
    def _same_bucket(grant: Grant, admitted_ms: int) -> bool:
        check = grant.check
        return check.kind != "sw" or admitted_ms // check.p2 == grant.admitted_ms // check.p2

    @staticmethod
    def _held(grant: Grant) -> int:
        return grant.slots if grant.check.kind == "cc" else grant.remaining

    # --- renewal -------------------------------------------------------------------------------------------

    def until_renewal(self) -> float:
        """Seconds until the grants of the period that began last are due for renewal (0: now)."""
        period = GRANT_MS / 1000
        if self._phase is None:
            return period
        now = self._clock()
        begun = self._phase + math.floor((now - self._phase) / period) * period
        # Half a period of slack: the phase moves by a round trip's jitter from one reply to the next.
        due = begun if begun > self._renewed_for + period / 2 else begun + period
        return max(due + RENEW_DELAY - now, 0.0)

    def renewals(self) -> list[Renewal]:
        """The grants whose period has ended and that admitted requests in it, asked for again for the period just
        begun, one admission per scope: each for as many requests as it admitted (concurrency: twice the slots it
        had in use at once), at least the first grant's size, within the usual headroom. The ended grants leave
        the worker now; `Grants.returns` of each renewal's `ended` gives them back in its round trip."""
        now = self._clock()
        if self._phase is not None:
            period = GRANT_MS / 1000
            self._renewed_for = self._phase + math.floor((now - self._phase) / period) * period
        periods = Periods.at(int(self._wall() * 1000))
        scopes: dict[int, list[tuple[Check, Grant]]] = {}
        for grant in self._ended(now):
            size = self._renewal_size(grant, periods)
            if size:
                old = grant.check
                check = Check(old.kind, old.key, old.limit, size, old.p1, old.p2, old.tokens, old.scope, old.metric)
                scopes.setdefault(id(old.scope), []).append((check, grant))
            else:
                self._retired.append(grant)
        renewals = []
        owner = uuid.uuid4().hex[:16]
        for index, entries in enumerate(scopes.values()):
            checks: list[Check] = [check for check, _ in entries]
            ended: list[Grant | None] = [grant for _, grant in entries]
            if any(check.kind in ("bd", "bm") for check in checks):
                marker = marker_key(slot_of(checks[0].key))
                checks.insert(0, Check("mk", marker, 0, 0, 0, 0, False, None, "marker"))
                ended.insert(0, None)
            call = AdmitCall(checks, f"renew-{owner}-{index}", periods, 0, 0)
            renewals.append(Renewal(call, ended, self._generation))
        return renewals

    def _ended(self, now: float) -> list[Grant]:
        """Live grants past their end that admitted requests, taken out of the worker (marked returned)."""
        last = math.ceil(now * SWEEPS_PER_SECOND)
        live = self._live
        ended = []
        for slot in sorted(slot for slot in self._expiries if self._renewal_cursor <= slot <= last):
            for grant in self._expiries[slot]:
                # A grant topped up is listed in two slots: taken out at the first, it is no longer live at the other.
                if grant.uses and now >= grant.valid_until and live.get(grant.check.key) is grant:
                    del live[grant.check.key]
                    grant.returned = True
                    ended.append(grant)
        self._renewal_cursor = math.floor(now * SWEEPS_PER_SECOND) + 1  # slots wholly in the past are done
        return ended

    def _renewal_size(self, grant: Grant, periods: Periods) -> int:
        check = grant.check
        if check.kind in ("bd", "bm") and Periods.at(grant.admitted_ms).day_start != periods.day_start:
            return 0  # its counter is yesterday's
        unit = grant.unit
        if check.kind == "cc":
            requests = min(max(2 * grant.peak, FIRST_SLOTS), MAX_GRANT)
        else:
            requests = min(max(grant.uses, FIRST_GRANT), MAX_GRANT)
        size = min(unit * requests, (check.limit - grant.usage) // HEADROOM_SHARE)
        return size if size >= 2 * unit else 0

    def renewed(self, renewals: Sequence[Renewal], results: Sequence[AdmitResult]) -> None:
        """Keep what the store granted; a renewal it refused leaves its scope to the next request's admission."""
        now = self._clock()
        for renewal, result in zip(renewals, results, strict=True):
            if result.code != AdmitResult.ADMITTED:
                continue
            call = renewal.call
            for index, (check, ended) in enumerate(zip(call.checks, renewal.ended, strict=True)):
                if ended is None:
                    continue
                usage = result.values[index]
                if renewal.generation != self._generation:  # limits changed meanwhile: it goes straight back
                    self._retired.append(self._orphan(check, result.now_ms, call.request_id))
                    continue
                self._seen.pop(check.key, None)
                self._seen[check.key] = (usage, now)
                if check.kind == "cc":  # the call's own member is a slot too
                    grant = self._keep(check, check.amount - 1, result.now_ms, call, now, usage, 1)
                    grant.free.append(call.request_id)
                else:
                    grant = self._keep(check, check.amount, result.now_ms, call, now, usage, ended.unit)
                grant.size = check.amount // ended.unit

    @staticmethod
    def _orphan(check: Check, admitted_ms: int, request_id: str) -> Grant:
        """A reservation nobody will use, as a grant to give back."""
        if check.kind == "cc":
            grant = Grant(check, admitted_ms, 0.0, 0, owner=request_id, unissued=check.amount - 1)
            grant.free.append(request_id)
        else:
            grant = Grant(check, admitted_ms, 0.0, 0, remaining=check.amount)
        grant.returned = True
        return grant

    def retire(self, grants: Sequence[Grant]) -> None:
        """Grants whose renewal could not be sent: they go back with the next sweep."""
        self._retired.extend(grants)

    # --- settlement ----------------------------------------------------------------------------------------

    @staticmethod
    def settle(taken: Taken, deltas: Sequence[int], request_id: str, admitted_ms: int) -> list[SettleCall]:
        """Settle a request into the grants it was admitted with; what has no live grant needs the store."""
        calls: dict[tuple[int, str], tuple[list[Check], list[int]]] = {}
        for (grant, check, member), delta in zip(taken, deltas, strict=True):
            if grant is not None and not grant.returned:
                if member:
                    grant.free.append(member)  # the slot is the grant's now, for the next request
                else:
                    grant.remaining -= delta
            elif member or delta:
                at = grant.admitted_ms if grant is not None else admitted_ms
                checks, check_deltas = calls.setdefault((at, member or request_id), ([], []))
                checks.append(check)
                check_deltas.append(delta)
        return [SettleCall(checks, d, who, at) for (at, who), (checks, d) in calls.items()]

    def settled(self, calls: Sequence[SettleCall]) -> None:
        """This worker's settlements through the store, so that its grants' usage (for headers) includes them."""
        live = self._live
        for call in calls:
            for check, delta in zip(call.checks, call.deltas, strict=True):
                grant = live.get(check.key)
                if grant is not None:
                    grant.usage += -1 if check.kind == "cc" else delta

    # --- return --------------------------------------------------------------------------------------------

    def due(self, everything: bool = False) -> list[Grant]:
        """The grants to give back now, marked returned: those superseded, and those expired at least SWEEP_GRACE
        ago (a key in use returns its own sooner, with its next admission); all of them at shutdown."""
        grants, self._retired = self._retired, []
        if everything:
            grants += self._live.values()
            self._live.clear()
            self._expiries.clear()
            self._seen.clear()
        else:
            now = self._clock()
            last = int((now - SWEEP_GRACE) * SWEEPS_PER_SECOND)
            for slot in [slot for slot in self._expiries if slot <= last]:
                for grant in self._expiries.pop(slot):
                    if self._live.get(grant.check.key) is not grant:
                        continue  # already returned, or superseded (then it is in the list above)
                    if now < grant.valid_until:
                        self._expire_at(grant)  # topped up since: it expires later
                    else:
                        del self._live[grant.check.key]
                        grants.append(grant)
            self._forget_quiet(now)
        for grant in grants:
            grant.returned = True
        return grants

    def _forget_quiet(self, now: float) -> None:
        seen = self._seen
        quiet = []
        for key, (_, seen_at) in seen.items():
            if now - seen_at < SEEN_SECONDS:
                break
            quiet.append(key)
        for key in quiet:
            del seen[key]

    def _expire_at(self, grant: Grant) -> None:
        slot = math.ceil(grant.valid_until * SWEEPS_PER_SECOND)
        self._expiries.setdefault(slot, []).append(grant)

    def expire_all(self) -> None:
        """Limits changed: no grant admits any more; they go back with the next sweep or admission."""
        self._generation += 1
        self._retired += self._live.values()
        self._live.clear()
        self._expiries.clear()
        self._seen.clear()

    def forget(self, key: str) -> Grant | None:
        """Stop granting for a check the store refused: its grant goes back at once."""
        grant = self._live.pop(key, None)
        if grant is not None:
            grant.returned = True
        return grant

    @staticmethod
    def returns(grants: Sequence[Grant]) -> Returning:
        """What giving grants back takes: settlements of the unused amounts, and the concurrency slots to release."""
        # One settlement per hash slot and bucket: a key's grants, ending together, go back in one script call.
        settle: dict[tuple[str, int], tuple[list[Check], list[int]]] = {}
        release: list[tuple[str, list[str]]] = []
        for grant in grants:
            check = grant.check
            if check.kind == "cc":
                if grant.slots:
                    release.append((check.key, grant.unused_slots()))
            elif grant.remaining:
                checks, deltas = settle.setdefault((slot_of(check.key), grant.admitted_ms), ([], []))
                checks.append(check)
                deltas.append(-grant.remaining)
                grant.remaining = 0
        calls = [SettleCall(checks, deltas, "grant", at) for (_, at), (checks, deltas) in settle.items()]
        return calls, release
