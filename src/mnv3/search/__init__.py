"""The paper's search (§4), for the user's own platform: where latency is measured
(:mod:`mnv3.search.platform`), and, as they land, the per-block latency table and NetAdapt."""
