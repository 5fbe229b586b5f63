"""fastdpo inside other trainers (``fastdpo.integrations.trl``)."""
