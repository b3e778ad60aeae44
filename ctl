disable
enable
disable
