"""The Django admin for alarms: see what is pending, late, failing and why; act through the API.

Built to stay fast at a million rows: no full-table COUNT (counts are capped), filters whose choices
come from configuration rather than ``SELECT DISTINCT``, sorts and searches that indexes serve.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from . import registry, states
from .checking import known_tasks
from .exceptions import SchedullerError
from .message import DATETIME_TAG
from .models import Alarm, AlarmAttempt
from .scheduller import Scheduller

if TYPE_CHECKING:
    _AlarmAdminBase = admin.ModelAdmin[Alarm]
    _AttemptAdminBase = admin.ModelAdmin[AlarmAttempt]
else:  # ModelAdmin is generic only in the type stubs
    _AlarmAdminBase = _AttemptAdminBase = admin.ModelAdmin

#: Above this many matching rows the changelist says "more than N" instead of counting them all.
COUNT_CAP = 10_000
#: A search with at most this many matches is read by primary key (``AlarmAdmin.get_search_results``).
SEARCH_MATCHES = COUNT_CAP
#: How many alarms an action on "all matching the filter" reads per query.
ACTION_BATCH = 1_000
#: The most alarms one admin action changes, inside one HTTP request; a larger selection is refused with a
#: message saying how to narrow it (or to use the API from a shell or a task for bulk changes).
ACTION_LIMIT = 5_000


class CappedPaginator(Paginator):  # type: ignore[type-arg]
    """Counts at most ``COUNT_CAP + 1`` rows, so a page never waits for a count of a million rows."""

    @cached_property
    def count(self) -> int:
        query = self.object_list
        if isinstance(query, QuerySet):
            return len(query.values_list("pk", flat=True)[: COUNT_CAP + 1])
        return len(query)


class SchedullerFilter(admin.SimpleListFilter):
    """Filter by owning Scheduller; the choices are ``CELERY_SCHEDULLER_CLASSES``."""

    title = "Scheduller"
    parameter_name = "scheduller"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in registry.names()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> QuerySet[Alarm]:
        return queryset.filter(scheduller=self.value()) if self.value() else queryset


class TaskFilter(admin.SimpleListFilter):
    """Filter by task; the choices are the Celery app's registered tasks."""

    title = "task"
    parameter_name = "task"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in sorted(known_tasks() or ()) if not name.startswith("celery.")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> QuerySet[Alarm]:
        return queryset.filter(task_name=self.value()) if self.value() else queryset


class StatusFilter(admin.SimpleListFilter):
    """What the operator asks first: what is on the schedule (the default), what is failing, each state."""

    title = "status"
    parameter_name = "status"
    ALL = "all"
    FAILING = "failing"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            (self.FAILING, "failing (retried after an error or a timeout)"),
            *((state, state) for state, _label in states.CHOICES),
            (self.ALL, "all, history included"),
        ]

    def choices(self, changelist: Any) -> Iterator[Any]:
        yield {
            "selected": self.value() is None,
            "query_string": changelist.get_query_string(remove=[self.parameter_name]),
            "display": "on the schedule (pending, published)",
        }
        for lookup, title in self.lookup_choices:
            yield {
                "selected": self.value() == str(lookup),
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> QuerySet[Alarm]:
        value = self.value()
        if value == self.ALL:
            return queryset
        if value == self.FAILING:
            return queryset.filter(failing=True, state__in=states.ACTIVE)
        if value in {state for state, _label in states.CHOICES}:
            return queryset.filter(state=value)
        return queryset.filter(state__in=states.ACTIVE)


class LateFilter(admin.SimpleListFilter):
    """Pending alarms whose time has passed, and published attempts past their deadline."""

    title = "lateness"
    parameter_name = "late"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("overdue", "overdue (pending, time passed)"), ("unanswered", "unanswered past deadline")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> QuerySet[Alarm]:
        now = timezone.now()
        if self.value() == "overdue":
            return queryset.filter(state=states.PENDING, dispatch_at__lt=now)
        if self.value() == "unanswered":
            return queryset.filter(state=states.PUBLISHED, deadline__lt=now)
        return queryset


class RescheduleForm(forms.Form):
    """When to move the selected alarms to: a time, or a delay from now."""

    at = forms.DateTimeField(
        required=False, label="at (UTC)", widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    delay_seconds = forms.IntegerField(required=False, min_value=0, label="or in (seconds)")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if (data.get("at") is None) == (data.get("delay_seconds") is None):
            raise forms.ValidationError("Give either a time or a delay.")
        at = data.get("at")
        if at is not None and timezone.is_naive(at):
            data["at"] = timezone.make_aware(at, dt.UTC)
        return data


def _pretty(value: Any) -> str:
    """Stored JSON as an operator reads it: indented, datetimes as ISO 8601 text, not their stored tag."""
    readable = _readable(value)
    return format_html("<pre class='csched-json'>{}</pre>", json.dumps(readable, indent=2, sort_keys=True))


def _seconds(moment: dt.datetime | None) -> str:
    """A time as the admin shows it: UTC, to the second (to the millisecond where that is not .000)."""
    if moment is None:
        return "—"
    moment = moment.astimezone(dt.UTC)
    millis = moment.microsecond // 1000
    return f"{moment:%Y-%m-%d %H:%M:%S}" + (f".{millis:03d}" if millis else "")


def _readable(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and DATETIME_TAG in value:
            return value[DATETIME_TAG]
        return {key: _readable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_readable(item) for item in value]
    return value


@admin.register(Alarm)
class AlarmAdmin(_AlarmAdminBase):
    """Read-only alarms with actions that go through the Scheduller API."""

    # fits a laptop screen: the Scheduller is a filter, not a column
    list_display = ("message_id", "task_name", "aggregate_id", "due", "state", "attempt", "last_status")
    list_filter = (StatusFilter, LateFilter, SchedullerFilter, TaskFilter)
    search_fields = ("=message_id", "=aggregate_id", "=correlation_id")
    search_help_text = "An exact message id, aggregate id or correlation id."
    date_hierarchy = "dispatch_at"
    # what comes next first: the overdue on top, then the soonest due
    ordering = ("dispatch_at",)
    # only columns an index can sort at a million rows
    sortable_by = ("message_id", "aggregate_id", "dispatch_at")
    list_per_page = 100
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts are a COUNT per filter choice
    paginator = CappedPaginator
    actions = ("dispatch_now", "cancel", "reschedule", "restart")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "message_id",
                    "scheduller",
                    "task_name",
                    "aggregate_id",
                    "state",
                    "attempt",
                    "callback_failures",
                )
            },
        ),
        ("Timing (UTC)", {"fields": ("due", "published", "deadline_s", "finished", "created", "updated")}),
        ("Message", {"fields": ("correlation_id", "causation_id", "raw_request_pretty", "assigns_pretty")}),
        ("Responses", {"fields": ("last_response_pretty", "attempt_history")}),
    )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Alarm], search_term: str
    ) -> tuple[QuerySet[Alarm], bool]:
        """Exact, case-sensitive matches, which the unique and secondary indexes serve.

        The matches are found first, by those indexes alone (at most SEARCH_MATCHES of them), and the page then
        reads them by primary key: the planner cannot walk the ``dispatch_at`` index looking for a match, as it
        did for the page's order and the date hierarchy's MIN/MAX under stale statistics (half a minute at ten
        million rows). A search with more matches than that is broad enough for the plain filter."""
        term = search_term.strip()
        if not term:
            return queryset, False
        matching = Q(message_id=term) | Q(aggregate_id=term) | Q(correlation_id=term)
        found = list(Alarm.objects.filter(matching).values_list("pk", flat=True)[: SEARCH_MATCHES + 1])
        if len(found) <= SEARCH_MATCHES:
            return queryset.filter(pk__in=found), False
        return queryset.filter(matching), False

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        """Drop date drill-down parameters that name no valid period (a hand-edited URL): a part without
        the parts above it, a month 13, a year past 9999. Django's own parsing would fail on some of them."""
        from .templatetags.csched_admin import FIELD, period

        names = [f"{FIELD}__{part}" for part in ("year", "month", "day")]
        if any(name in request.GET for name in names):
            valid = dict(zip(names, period(request.GET), strict=True))
            query = request.GET.copy()
            for name in names:
                query.pop(name, None)
                if valid[name]:
                    query[name] = valid[name]
            request.GET = query  # type: ignore[assignment]
        return super().changelist_view(request, {"title": "Alarms", **(extra_context or {})})

    def get_urls(self) -> list[Any]:
        from django.urls import path

        dashboard = path(
            "dashboard/",
            self.admin_site.admin_view(self.dashboard_view),
            name="celery_scheduller_alarm_dashboard",
        )
        return [dashboard, *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """One page to open first: what comes due, what happened in the last hour, lateness, backlog, beats."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        from . import dashboard

        board = dashboard.read()
        totals = dashboard.totals(board)
        context = {
            **self.admin_site.each_context(request),
            "title": "Alarms dashboard",
            "opts": self.model._meta,
            "board": board,
            "charts": {name: mark_safe(svg) for name, svg in dashboard.charts(board).items()},
            "totals": totals,
            "legend": [(name, dashboard.COLOURS[name], totals[name]) for name in dashboard.SERIES],
            "due_hours": dashboard.DUE_HOURS,
            "count_limit": dashboard.COUNT_LIMIT,
        }
        return TemplateResponse(request, "admin/celery_scheduller/alarm/dashboard.html", context)

    def get_readonly_fields(self, request: HttpRequest, obj: Alarm | None = None) -> list[str]:
        return [str(name) for _, options in self.fieldsets for name in options["fields"]]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # alarms are made by Scheduller.dispatch

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """Read-only: the page shows the alarm; state changes go through the actions (the API)."""
        if request.method == "POST":
            raise PermissionDenied("alarms change through the actions, not by editing fields")
        context = {
            **(extra_context or {}),
            "title": "View alarm",
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
            "show_delete": False,
        }
        return super().change_view(request, object_id, form_url, context)

    def has_delete_permission(self, request: HttpRequest, obj: Alarm | None = None) -> bool:
        return False  # the cancel action removes alarms, through the API

    @admin.display(description="due (UTC)", ordering="dispatch_at")
    def due(self, obj: Alarm) -> str:
        return format_html('<span style="white-space: nowrap">{}</span>', _seconds(obj.dispatch_at))

    @admin.display(description="published")
    def published(self, obj: Alarm) -> str:
        return _seconds(obj.published_at)

    @admin.display(description="deadline")
    def deadline_s(self, obj: Alarm) -> str:
        return _seconds(obj.deadline)

    @admin.display(description="ended")
    def finished(self, obj: Alarm) -> str:
        return _seconds(obj.finished_at)

    @admin.display(description="created")
    def created(self, obj: Alarm) -> str:
        return _seconds(obj.created_at)

    @admin.display(description="last change")
    def updated(self, obj: Alarm) -> str:
        return _seconds(obj.updated_at)

    @admin.display(description="last answer")
    def last_status(self, obj: Alarm) -> str:
        response = obj.last_response or {}
        status = str(response.get("status", "—"))
        error = str(response.get("error") or "")
        if obj.callback_failures:
            error = f"service_responded failed {obj.callback_failures}× · {error}"
        if response.get("reason"):  # given up by service_responded (``Fail``)
            error = f"{error + ' · ' if error else ''}failed: {response['reason']}"
        return f"{status}: {error[:60]}{'…' if len(error) > 60 else ''}" if error else status

    @admin.display(description="raw request")
    def raw_request_pretty(self, obj: Alarm) -> str:
        return _pretty(obj.raw_request)

    @admin.display(description="assigns")
    def assigns_pretty(self, obj: Alarm) -> str:
        return _pretty(obj.assigns)

    @admin.display(description="last response")
    def last_response_pretty(self, obj: Alarm) -> str:
        return _pretty(obj.last_response) if obj.last_response else "—"

    @admin.display(description="attempt history")
    def attempt_history(self, obj: Alarm) -> str:
        attempts = AlarmAttempt.objects.filter(message_id=obj.message_id).order_by("attempt", "responded_at")
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (a.attempt, a.published_at or "—", a.responded_at, a.status, a.error or "—", a.decision)
                for a in attempts[:200]
            ),
        )
        if not rows:
            return "—"
        return format_html(
            "<table class='csched-attempts'><thead><tr><th>attempt</th><th>published at</th>"
            "<th>responded at</th><th>status</th><th>error</th><th>decision</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    # -- actions: each calls the Scheduller API for every selected alarm -------------------------

    @admin.action(description="Dispatch selected alarms now", permissions=["change"])
    def dispatch_now(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> None:
        self._apply(request, queryset, "dispatched now", lambda s, m: s.dispatch_now(m), "not pending")

    @admin.action(description="Cancel selected alarms", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> None:
        self._apply(
            request,
            queryset,
            "cancelled",
            lambda s, m: s.cancel(m),
            "not on the schedule",
            bulk=lambda s, ids: len(s._cancel(None, message_ids=ids)),  # one statement per batch
        )

    @admin.action(description="Retry selected ended alarms (finished, failed, cancelled)", permissions=["change"])
    def restart(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> None:
        self._apply(request, queryset, "put back on the schedule", lambda s, m: s.restart(m), "not ended")

    @admin.action(description="Reschedule selected alarms…", permissions=["change"])
    def reschedule(self, request: HttpRequest, queryset: QuerySet[Alarm]) -> HttpResponse | None:
        form = RescheduleForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            at: dt.datetime | None = form.cleaned_data.get("at")
            delay: int = form.cleaned_data.get("delay_seconds") or 0
            if at is not None:
                self._apply(
                    request,
                    queryset,
                    f"rescheduled to {at:%Y-%m-%d %H:%M:%S %Z}",
                    lambda s, m: s.reschedule(m, at=at),
                    "not pending",
                )
            else:
                self._apply(
                    request,
                    queryset,
                    f"rescheduled to {delay} s from now",
                    lambda s, m: s.reschedule(m, in_ms=delay * 1000),
                    "not pending",
                )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Reschedule alarms",
            "opts": self.model._meta,
            "form": form,
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action": "reschedule",
            "preview": list(queryset.values_list("message_id", flat=True)[:20]),
        }
        return TemplateResponse(request, "admin/celery_scheduller/alarm/reschedule.html", context)

    def _apply(
        self,
        request: HttpRequest,
        queryset: QuerySet[Alarm],
        done: str,
        act: Callable[[Scheduller, str], bool],
        skipped_because: str,
        bulk: Callable[[Scheduller, list[str]], int] | None = None,
    ) -> None:
        if _too_many(queryset):
            self.message_user(
                request,
                f"More than {ACTION_LIMIT:,} alarms are selected: nothing was changed. An admin action changes at "
                f"most {ACTION_LIMIT:,} within one request; narrow the selection with the filters (a Scheduller, "
                "a state, a date), or call the Scheduller API (cancel_aggregate, reschedule…) from a shell or a task.",
                messages.ERROR,
            )
            return
        changed = skipped = 0
        errors: list[str] = []
        for name, message_ids in _selected(queryset):
            if bulk is not None:
                try:
                    done_here = bulk(registry.get(name), message_ids)
                except SchedullerError as exc:
                    errors.append(f"{len(message_ids)} alarm(s) of {name}: {exc}")
                    continue
                changed += done_here
                skipped += len(message_ids) - done_here
                continue
            for message_id in message_ids:
                try:
                    ok = act(registry.get(name), message_id)
                except SchedullerError as exc:
                    errors.append(f"{message_id}: {exc}")
                    continue
                changed += ok
                skipped += not ok
        self.message_user(request, f"{changed} alarm(s) {done}.", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} alarm(s) skipped: {skipped_because}.", messages.WARNING)
        for error in errors[:10]:
            self.message_user(request, error, messages.ERROR)


def _too_many(queryset: QuerySet[Alarm]) -> bool:
    """More than ACTION_LIMIT alarms selected, counted no further than that."""
    return queryset.order_by().values("pk")[: ACTION_LIMIT + 1].count() > ACTION_LIMIT


def _selected(queryset: QuerySet[Alarm]) -> Iterator[tuple[str, list[str]]]:
    """(Scheduller, message ids) of the selected alarms, read in batches by primary key."""
    last = 0
    while True:
        batch = list(
            queryset.order_by("pk").filter(pk__gt=last).values_list("pk", "scheduller", "message_id")[:ACTION_BATCH]
        )
        if not batch:
            return
        last = batch[-1][0]
        by_name: dict[str, list[str]] = {}
        for _pk, name, message_id in batch:
            by_name.setdefault(name, []).append(message_id)
        yield from by_name.items()


@admin.register(AlarmAttempt)
class AlarmAttemptAdmin(_AttemptAdminBase):
    """Answered attempts, read-only."""

    list_display = ("message_id", "attempt", "status", "decision", "published_at", "responded_at")
    search_fields = ("=message_id",)
    list_filter = ("status",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedPaginator

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AlarmAttempt | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AlarmAttempt | None = None) -> bool:
        return False
