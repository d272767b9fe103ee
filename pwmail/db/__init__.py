"""The user database (PostgreSQL): the schema (schema.sql, docs/database.md),
`pwmail db init/import/export` and `pwmail user`. Tools layer: pwserver
itself never imports this package."""
