"""Routing among recycled LoRA experts (MoErging): Arrow and the routed layer, bundles, loading."""
