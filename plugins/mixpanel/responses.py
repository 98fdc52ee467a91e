"""What Mixpanel's answers mean per payload: /import's partial failures in strict mode, and
/engage and /groups refusals inside a 200."""

from __future__ import annotations

from collections.abc import Sequence

from router import HttpResponse, Outcome, Payload, PermanentError


def import_outcomes(payloads: Sequence[Payload], response: HttpResponse
                    ) -> list[Outcome] | None:
    """A strict /import 400 lists the records it refused and ingests the rest ("400 Bad
    Request": a partial success), so only those are failures. Records are matched by their
    index in the request, else by ``$insert_id``; when none can be matched the status decides."""
    body = response.json()
    failed = body.get("failed_records") if response.status == 400 and isinstance(body, dict) \
        else None
    if not isinstance(failed, list) or not failed:
        return None
    by_index: dict[int, dict] = {}
    by_insert_id: dict[str, dict] = {}
    for record in failed:
        if not isinstance(record, dict):
            continue
        if type(record.get("index")) is int:  # a bool is not a position
            by_index[record["index"]] = record
        if isinstance(record.get("insert_id"), str):
            by_insert_id[record["insert_id"]] = record
    outcomes: list[Outcome] = []
    for index, payload in enumerate(payloads):
        record = by_index.get(index) or by_insert_id.get(payload.body["properties"]["$insert_id"])
        outcomes.append(None if record is None else PermanentError(
            f"Mixpanel refused the event: {record.get('field', '?')}: "
            f"{record.get('message', 'invalid')}"))
    return outcomes if any(outcomes) else None


def profile_outcomes(payloads: Sequence[Payload], response: HttpResponse
                     ) -> list[Outcome] | None:
    """/engage and /groups answer 200 even when they refuse an update; the verbose body
    (``{"status": 0, "error": ...}``) says so ("Profile Set" note). Mixpanel validates such a
    batch as a whole, so a refusal fails every update in it."""
    if not 200 <= response.status < 300:
        return None
    body = response.json()
    status = body.get("status") if isinstance(body, dict) else body
    if status != 0:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    reason = f"Mixpanel refused the update: {error or 'status 0'}"
    return [PermanentError(reason) for _ in payloads]
