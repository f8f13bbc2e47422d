"""Backup and restore of one instance: its database and its stored files in one archive (service),
the database snapshot per engine (databases), `flask --app webapp backup ...` (cli)."""
