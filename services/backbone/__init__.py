"""The floor every running part stands on: settings, errors, the NATS link, the stream
declarations and guarded (expected-sequence) publish. Knows no family and no upper layer."""
