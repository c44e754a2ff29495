"""Scenario files: the model and loader (``model``), value parsers (``values``) and the runner (``runner``)."""

from iommusim.tools.scenario.model import STEP_KINDS, Scenario, ScenarioError, Step, load_scenario, parse_scenario

__all__ = ["STEP_KINDS", "Scenario", "ScenarioError", "Step", "load_scenario", "parse_scenario"]
