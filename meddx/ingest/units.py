"""Units of FHIR Observation values: one canonical unit per quantity.

Hospitals report the same lab in different units (CRP in mg/L or mg/dL, temperature in
Cel or [degF], glucose in mg/dL or mmol/L). Before values are binned and normalised,
every value is converted to one canonical unit, so that a tensorizer fitted at one site
reads another site's data the same way.

Two small tables do it:

* :data:`UNITS` places each unit spelling (UCUM codes and common display forms) on a
  dimension with a factor to that dimension's base unit (mass concentration in g/L,
  substance concentration in mol/L, cell counts per litre, mass in kg, length in cm,
  pressure in mm[Hg], rates per minute, fractions in %). Temperature is affine and
  handled apart. Any two units of one dimension convert into each other.
* :data:`CANONICAL` names the canonical unit of common LOINC codes, and
  :data:`MOLAR_MASS` (g/mol) lets mass and substance concentrations of one analyte
  convert into each other (glucose mg/dL <-> mmol/L, creatinine mg/dL <-> umol/L...).

:data:`PLAUSIBLE` bounds each canonical code's values to what a living patient (or a
working analyser) can give, wide enough for the extreme cases that do occur (glucose of
2600 mg/dL, leukocytes of 1000 x 10^3/uL); :func:`is_plausible` also refuses non-finite
values, and values of other codes beyond 1e15 in magnitude.

LOINC codes not in :data:`CANONICAL` keep the unit they arrive in (spelling normalised);
the EHR tensorizer then fits the most common unit of each code on the training records
and converts into it with the same tables.
"""

from __future__ import annotations

import math

# unit spelling -> (dimension, factor to the dimension's base unit)
UNITS: dict[str, tuple[str, float]] = {
    # mass concentration, base g/L
    "g/L": ("mass_conc", 1.0),
    "g/dL": ("mass_conc", 10.0),
    "mg/mL": ("mass_conc", 1.0),
    "mg/dL": ("mass_conc", 1e-2),
    "mg/L": ("mass_conc", 1e-3),
    "ug/mL": ("mass_conc", 1e-3),
    "ug/dL": ("mass_conc", 1e-5),
    "ug/L": ("mass_conc", 1e-6),
    "ng/mL": ("mass_conc", 1e-6),
    "ng/dL": ("mass_conc", 1e-8),
    "ng/L": ("mass_conc", 1e-9),
    "pg/mL": ("mass_conc", 1e-9),
    # substance concentration, base mol/L
    "mol/L": ("subst_conc", 1.0),
    "mmol/L": ("subst_conc", 1e-3),
    "umol/L": ("subst_conc", 1e-6),
    "nmol/L": ("subst_conc", 1e-9),
    "pmol/L": ("subst_conc", 1e-12),
    # number concentration (cell counts), base 1/L
    "10*12/L": ("num_conc", 1e12),
    "10*9/L": ("num_conc", 1e9),
    "10*6/uL": ("num_conc", 1e12),
    "10*3/uL": ("num_conc", 1e9),
    "10*3/mm3": ("num_conc", 1e9),
    "/uL": ("num_conc", 1e6),
    "/mm3": ("num_conc", 1e6),
    # mass, base kg
    "kg": ("mass", 1.0),
    "g": ("mass", 1e-3),
    "[lb_av]": ("mass", 0.45359237),
    "[oz_av]": ("mass", 0.028349523125),
    # length, base cm
    "cm": ("length", 1.0),
    "m": ("length", 100.0),
    "mm": ("length", 0.1),
    "[in_i]": ("length", 2.54),
    "[ft_i]": ("length", 30.48),
    # pressure, base mm[Hg]
    "mm[Hg]": ("pressure", 1.0),
    "kPa": ("pressure", 7.500617),
    # rates, base per minute
    "/min": ("rate", 1.0),
    "/s": ("rate", 60.0),
    "/h": ("rate", 1 / 60),
    # fractions, base %
    "%": ("fraction", 1.0),
    # body mass index, base kg/m2
    "kg/m2": ("bmi", 1.0),
}

# display spellings seen in real exports -> the UCUM code used above
SYNONYMS: dict[str, str] = {
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "g/l": "g/L",
    "mg/l": "mg/L",
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "µmol/L": "umol/L",
    "μmol/L": "umol/L",
    "µg/L": "ug/L",
    "μg/L": "ug/L",
    "mcg/L": "ug/L",
    "µg/mL": "ug/mL",
    "mcg/mL": "ug/mL",
    "10^3/uL": "10*3/uL",
    "10^9/L": "10*9/L",
    "10^12/L": "10*12/L",
    "10^6/uL": "10*6/uL",
    "K/uL": "10*3/uL",
    "x10E3/uL": "10*3/uL",
    "thou/uL": "10*3/uL",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "[lb_us]": "[lb_av]",
    "in": "[in_i]",
    "inch": "[in_i]",
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    "{beats}/min": "/min",
    "{breaths}/min": "/min",
    "beats/min": "/min",
    "breaths/min": "/min",
    "bpm": "/min",
    "min-1": "/min",
    "kg/m^2": "kg/m2",
    "degC": "Cel",
    "°C": "Cel",
    "C": "Cel",
    "degF": "[degF]",
    "°F": "[degF]",
    "F": "[degF]",
    "mEq/L": "meq/L",
}

TEMPERATURE_UNITS = ("Cel", "[degF]", "K")

# molar masses (g/mol) of analytes reported both in mass and in substance concentration
MOLAR_MASS: dict[str, float] = {
    "2339-0": 180.156,  # glucose, blood
    "2345-7": 180.156,  # glucose, serum/plasma
    "41653-7": 180.156,  # glucose, capillary (glucometer)
    "2160-0": 113.118,  # creatinine, serum/plasma
    "3094-0": 28.014,  # urea nitrogen (BUN: 2 N per urea)
    "2093-3": 386.654,  # cholesterol, total
    "18262-6": 386.654,  # LDL cholesterol (direct)
    "13457-7": 386.654,  # LDL cholesterol (calculated)
    "2085-9": 386.654,  # HDL cholesterol
    "2571-8": 885.7,  # triglycerides (as triolein)
    "17861-6": 40.078,  # calcium
    "1975-2": 584.66,  # bilirubin, total
    "2524-7": 90.08,  # lactate
    "32693-4": 90.08,  # lactate, blood
    "718-7": 16114.5,  # hemoglobin (per heme monomer)
}

# monovalent electrolytes: mEq/L is the same number as mmol/L
MONOVALENT = {"2951-2", "2823-3", "2075-0", "2028-9", "1963-8"}

# canonical unit of common LOINC codes
CANONICAL: dict[str, str] = {
    "6690-2": "10*3/uL",  # leukocytes
    "777-3": "10*3/uL",  # platelets
    "789-8": "10*6/uL",  # erythrocytes
    "1988-5": "mg/L",  # C reactive protein
    "30522-7": "mg/L",  # C reactive protein, high sensitivity
    "33959-8": "ng/mL",  # procalcitonin
    "718-7": "g/dL",  # hemoglobin
    "1751-7": "g/dL",  # albumin
    "2885-2": "g/dL",  # protein, total
    "2339-0": "mg/dL",
    "2345-7": "mg/dL",
    "41653-7": "mg/dL",
    "2160-0": "mg/dL",
    "3094-0": "mg/dL",
    "2093-3": "mg/dL",
    "18262-6": "mg/dL",
    "13457-7": "mg/dL",
    "2085-9": "mg/dL",
    "2571-8": "mg/dL",
    "17861-6": "mg/dL",
    "1975-2": "mg/dL",
    "2524-7": "mmol/L",
    "32693-4": "mmol/L",
    "2951-2": "mmol/L",  # sodium
    "2823-3": "mmol/L",  # potassium
    "2075-0": "mmol/L",  # chloride
    "2028-9": "mmol/L",  # carbon dioxide (bicarbonate)
    "1963-8": "mmol/L",  # bicarbonate
    "8310-5": "Cel",  # body temperature
    "8331-1": "Cel",  # oral temperature
    "8867-4": "/min",  # heart rate
    "9279-1": "/min",  # respiratory rate
    "8480-6": "mm[Hg]",  # systolic blood pressure
    "8462-4": "mm[Hg]",  # diastolic blood pressure
    "2708-6": "%",  # oxygen saturation, arterial
    "59408-5": "%",  # oxygen saturation, pulse oximetry
    "29463-7": "kg",  # body weight
    "8302-2": "cm",  # body height
    "39156-5": "kg/m2",  # body mass index
}


def normalize_unit(unit: str | None) -> str:
    """The UCUM spelling of a unit string (``"mg/dl"`` -> ``"mg/dL"``); ``""`` when unknown.

    Example:
        >>> normalize_unit("mmHg"), normalize_unit("°F"), normalize_unit(None)
        ('mm[Hg]', '[degF]', '')
    """
    if unit is None:
        return ""
    text = unit.strip()
    return SYNONYMS.get(text, text)


def convert(value: float, from_unit: str, to_unit: str, loinc: str | None = None) -> float | None:
    """Convert ``value`` between two units of one quantity; None when they do not convert.

    Args:
        value: the number in ``from_unit``.
        from_unit: its unit (UCUM or a display spelling in :data:`SYNONYMS`).
        to_unit: the wanted unit.
        loinc: the LOINC code of the analyte, which unlocks mass <-> substance
            concentration through its molar mass, and mEq/L for monovalent ions.

    Example:
        >>> convert(1.5, "mg/dL", "mg/L")
        15.0
        >>> convert(98.6, "[degF]", "Cel")
        37.0
        >>> round(convert(5.5, "mmol/L", "mg/dL", loinc="2345-7"), 1)
        99.1
    """
    src, dst = normalize_unit(from_unit), normalize_unit(to_unit)
    if loinc in MONOVALENT:
        src, dst = ("mmol/L" if u == "meq/L" else u for u in (src, dst))
    if src == dst:
        return float(value)
    if src in TEMPERATURE_UNITS or dst in TEMPERATURE_UNITS:
        return _convert_temperature(float(value), src, dst)
    if src not in UNITS or dst not in UNITS:
        return None
    (src_dim, src_factor), (dst_dim, dst_factor) = UNITS[src], UNITS[dst]
    base = float(value) * src_factor
    if src_dim != dst_dim:
        molar_mass = MOLAR_MASS.get(loinc or "")
        if molar_mass is None:
            return None
        if (src_dim, dst_dim) == ("subst_conc", "mass_conc"):
            base *= molar_mass
        elif (src_dim, dst_dim) == ("mass_conc", "subst_conc"):
            base /= molar_mass
        else:
            return None
    return _tidy(base / dst_factor)


def _convert_temperature(value: float, src: str, dst: str) -> float | None:
    to_celsius = {"Cel": lambda v: v, "[degF]": lambda v: (v - 32.0) * 5.0 / 9.0, "K": lambda v: v - 273.15}
    from_celsius = {"Cel": lambda v: v, "[degF]": lambda v: v * 9.0 / 5.0 + 32.0, "K": lambda v: v + 273.15}
    if src not in to_celsius or dst not in from_celsius:
        return None
    return _tidy(from_celsius[dst](to_celsius[src](value)))


def _tidy(value: float) -> float | None:
    # 12 significant digits: 4.76 mg/dL reads 47.6 mg/L, not 47.599999999999994
    return float(f"{value:.12g}") if math.isfinite(value) else None


def to_canonical(loinc: str, value: float, unit: str | None) -> tuple[float, str] | None:
    """``(value, unit)`` in the canonical unit of ``loinc``; None when the unit does not convert.

    Codes without a canonical unit keep theirs (spelling normalised).

    Example:
        >>> to_canonical("1988-5", 2.0, "mg/dL")
        (20.0, 'mg/L')
        >>> to_canonical("99999-9", 3.0, "mg/dl")
        (3.0, 'mg/dL')
    """
    unit = normalize_unit(unit)
    canonical = CANONICAL.get(loinc)
    if canonical is None:
        return float(value), unit
    converted = convert(value, unit, canonical, loinc=loinc)
    return None if converted is None else (converted, canonical)


# canonical code -> (lowest, highest) value a living patient can have, in the canonical unit
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "6690-2": (0.0, 1000.0),
    "777-3": (0.0, 5000.0),
    "789-8": (0.0, 20.0),
    "1988-5": (0.0, 2000.0),
    "30522-7": (0.0, 2000.0),
    "33959-8": (0.0, 5000.0),
    "718-7": (0.0, 30.0),
    "1751-7": (0.0, 15.0),
    "2885-2": (0.0, 30.0),
    "2339-0": (0.0, 5000.0),
    "2345-7": (0.0, 5000.0),
    "41653-7": (0.0, 5000.0),
    "2160-0": (0.0, 100.0),
    "3094-0": (0.0, 1000.0),
    "2093-3": (0.0, 5000.0),
    "18262-6": (0.0, 5000.0),
    "13457-7": (0.0, 5000.0),
    "2085-9": (0.0, 5000.0),
    "2571-8": (0.0, 50000.0),
    "17861-6": (0.0, 50.0),
    "1975-2": (0.0, 200.0),
    "2524-7": (0.0, 100.0),
    "32693-4": (0.0, 100.0),
    "2951-2": (0.0, 300.0),
    "2823-3": (0.0, 30.0),
    "2075-0": (0.0, 300.0),
    "2028-9": (0.0, 100.0),
    "1963-8": (0.0, 100.0),
    "8310-5": (10.0, 50.0),
    "8331-1": (10.0, 50.0),
    "8867-4": (0.0, 400.0),
    "9279-1": (0.0, 200.0),
    "8480-6": (0.0, 400.0),
    "8462-4": (0.0, 300.0),
    "2708-6": (0.0, 100.0),
    "59408-5": (0.0, 100.0),
    "29463-7": (0.0, 1000.0),
    "8302-2": (0.0, 300.0),
    "39156-5": (0.0, 300.0),
}
MAX_MAGNITUDE = 1e15  # codes without a PLAUSIBLE entry: beyond this no unit makes sense of a value


def is_plausible(loinc: str, value: float, unit: str | None = None) -> bool:
    """Whether a lab value can be real: finite, and inside :data:`PLAUSIBLE` for its code.

    The range applies to values in the code's canonical unit; pass ``unit`` when the value
    is in another one and it is converted first (a value that does not convert is judged
    by magnitude only).

    Example:
        >>> is_plausible("2345-7", 95.0), is_plausible("2345-7", 1e308), is_plausible("99999-9", float("nan"))
        (True, False, False)
    """
    if not math.isfinite(value):
        return False
    bounds = PLAUSIBLE.get(loinc)
    canonical = CANONICAL.get(loinc)
    if bounds is not None and unit is not None and canonical is not None and normalize_unit(unit) != canonical:
        converted = convert(value, unit, canonical, loinc=loinc)
        if converted is None:
            return abs(value) <= MAX_MAGNITUDE
        value = converted
    if bounds is None:
        return abs(value) <= MAX_MAGNITUDE
    return bounds[0] <= value <= bounds[1]
