"""Moving records from every rank and worker to the aggregator: buffer, wire format, sockets."""
