"""The sections of a report, in report order: ``SECTIONS`` lists functions ``section_x(ctx) -> Section | None``
(None: the section does not apply to these runs). Adding a section is adding one module and one entry here."""
from __future__ import annotations

from attnbench.report.sections.capability import section_capability
from attnbench.report.sections.cp import section_cp
from attnbench.report.sections.curves import section_curves
from attnbench.report.sections.efficiency import section_efficiency_length
from attnbench.report.sections.environment import section_environment
from attnbench.report.sections.masks import section_masks
from attnbench.report.sections.overview import section_overview
from attnbench.report.sections.pareto import section_pareto
from attnbench.report.sections.peak import section_peak
from attnbench.report.sections.profile import section_profile
from attnbench.report.sections.quality import section_quality
from attnbench.report.sections.scaling import section_scaling
from attnbench.report.sections.speedup import section_speedup

SECTIONS = (section_overview, section_masks, section_capability, section_curves, section_peak, section_speedup,
            section_efficiency_length, section_scaling, section_profile, section_pareto, section_cp, section_quality,
            section_environment)

# a run folder with quality rows only (attnbench train) has no kernel rows for the other sections to read
QUALITY_ONLY = (section_quality, section_environment)

__all__ = ["QUALITY_ONLY", "SECTIONS"]
