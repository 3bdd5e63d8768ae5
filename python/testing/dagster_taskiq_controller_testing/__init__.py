"""Test beds for dagster-taskiq-controller: `stack` (a moto server, queues and a controller
process) and `ecs` (moto's ECS with a local agent that really runs the tasks). Not part of the
product package and never installed in an image."""
