"""Optional integrations with training frameworks (each needs its extra, e.g. ``forgetkern[hf]``)."""
