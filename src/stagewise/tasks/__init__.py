"""stagewise.tasks: fine-tuning tasks' records, label maps, encoders and metrics."""
