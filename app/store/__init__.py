"""The database: the one owner of connections (db.py), the tables (models.py), migrations,
the write path (write.py: the SQL; writer.py: one batch's commit; ingestor.py: group commit;
writer_process.py: the writer in a child process), the forwarding outbox rows written in the
same commit (outbox.py), gathered keyed reads, and retention. It knows no routes."""
