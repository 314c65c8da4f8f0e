"""The functional core: pure code, no asyncio, no I/O, the time passed in.

- ``model``: the immutable dispatch value and its protobuf conversion.
- ``recurrence``: occurrences of a dispatch, built on dateutil's rrule.
- ``messages``: the lifecycle and running messages the engine emits.
- ``engine``: the state machine turning API changes and time into messages
  (one ``Step`` per call, with the records to store).
- ``records``: the stored record of a dispatch and its one codec.
- ``wire``: the wire format of those messages for AMQP (docs/messages.md).
- ``sendwindow``: which messages the publisher may send now, per dispatch in order.
- ``times``: aware UTC, epoch microseconds and month lengths, for all of the above.
"""
