"""The `filter` stage's parts: the rules in their fixed order (rules), caption language identification
(language), the global keep-top-fraction cutoff (top_fraction) and the report (report). docs/filters.md."""
