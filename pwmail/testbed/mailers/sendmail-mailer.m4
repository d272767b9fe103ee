OSTYPE(`debian')dnl
define(`LOCAL_MAILER_PATH', `/usr/local/bin/pdelivery')dnl
define(`LOCAL_MAILER_ARGS', `pdelivery -f $g -i $i -d $u')dnl
MODIFY_MAILER_FLAGS(`LOCAL', `lsDFMA5:/|@qn')dnl
