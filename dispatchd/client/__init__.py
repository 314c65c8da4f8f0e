"""The actor SDK: the frequenz.dispatch interface fed from RabbitMQ (not built yet)."""
