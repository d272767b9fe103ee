OSTYPE(`debian')dnl
define(`LOCAL_MAILER_PATH', `/usr/local/bin/pdelivery')dnl
define(`LOCAL_MAILER_ARGS', `pdelivery -l -i $i')dnl
MODIFY_MAILER_FLAGS(`LOCAL', `lsDFMA5:/|@qnmzX')dnl
