"""Publisher: outbox to RabbitMQ with confirms, pipelined, per-dispatch order kept (not built yet)."""
