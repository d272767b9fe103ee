OSTYPE(`debian')dnl
define(`LOCAL_MAILER_PATH', `[IPC]')dnl
define(`LOCAL_MAILER_ARGS', `TCP store1.example.org 24')dnl
define(`LOCAL_MAILER_EOL', `\r\n')dnl
MODIFY_MAILER_FLAGS(`LOCAL', `lsDFMA5:/|@qnmzX')dnl
