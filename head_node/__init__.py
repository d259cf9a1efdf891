"""The dcf head: registry of providers, scheduler, durable job store, REST API."""
