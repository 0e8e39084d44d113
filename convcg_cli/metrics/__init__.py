"""Metrics of ranked item ids: recall@k (micro, value-weighted, per group), overlap, bootstrap CIs.

Numpy in, numbers out: the rankings come from :mod:`convcg_cli.index`. Modules: :mod:`.retrieval`
(metric names, recall, overlap), :mod:`.bootstrap` (intervals and paired differences over users),
:mod:`.compare` (t-intervals across seeds), :mod:`.suite` (an evaluation split's recall report),
:mod:`.prior` (the popularity prior coordinate and its weight).
"""
